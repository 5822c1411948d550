"""Update a causal LM's knowledge with F-Learning: fine-tune on the old facts, subtract lambda
times that change, then fine-tune on the new facts.

    python examples/train_f_learning.py --output_dir out/f-learning --num_train_epochs 3 \\
        --learning_rate 5e-5 --forget_lambda 0.1
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml examples/train_f_learning.py \\
        --model meta-llama/Llama-2-7b-hf --data counterfact.json --output_dir out/f-learning \\
        --bf16 --gradient_checkpointing --per_device_train_batch_size 4

The same script as train_plain.py with FLearningTrainer and FLearningConfig (--forget_method,
--learn_method full|lora, --forget_lambda, --old_num_train_epochs, ...) and the old facts.
"""

from dataclasses import dataclass, field

from transformers import DataCollatorForSeq2Seq, HfArgumentParser

from ivtrainer import FLearningConfig, FLearningTrainer, load_model
from ivtrainer.datasets.edits import edit_dataset, load_edits


@dataclass
class ScriptArguments:
    model: str = field(
        default="default", metadata={"help": "'default' (SmolLM2-135M-Instruct), a Hub id or a folder"}
    )
    data: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (counterfacts the model knows; one process) or a CounterFact/ZsRE JSON file"
        },
    )
    max_edits: int | None = field(default=None, metadata={"help": "Use the first N edits only."})


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, FLearningConfig)).parse_args_into_dataclasses()
    model, tokenizer = load_model(script.model)  # after the arguments, so that ZeRO-3 loads it sharded
    edits = load_edits(script.data, model=model, tokenizer=tokenizer)[: script.max_edits]
    trainer = FLearningTrainer(
        model,
        args,
        train_dataset=edit_dataset(edits, tokenizer, "new"),
        old_dataset=edit_dataset(edits, tokenizer, "old"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
