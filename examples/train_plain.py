"""Fine-tune a causal LM on new facts with the Hugging Face Trainer: the baseline.

    python examples/train_plain.py --output_dir out/plain --num_train_epochs 3 --learning_rate 5e-5
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml examples/train_plain.py \\
        --model meta-llama/Llama-2-7b-hf --data counterfact.json --output_dir out/plain \\
        --bf16 --gradient_checkpointing --per_device_train_batch_size 4

train_iv_guided.py and train_f_learning.py are this script with another trainer and config:
diff them against this one to see the swap.
"""

from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, HfArgumentParser, Trainer, TrainingArguments

from ivtrainer import load_model
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
    lora_r: int = field(
        default=0, metadata={"help": "Train a LoRA adapter of this rank (q_proj, v_proj); 0: all weights."}
    )


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    model, tokenizer = load_model(script.model)  # after the arguments, so that ZeRO-3 loads it sharded
    edits = load_edits(script.data, model=model, tokenizer=tokenizer)[: script.max_edits]
    if script.lora_r:
        model = get_peft_model(
            model, LoraConfig(r=script.lora_r, lora_alpha=2 * script.lora_r, task_type="CAUSAL_LM")
        )
    trainer = Trainer(
        model,
        args,
        train_dataset=edit_dataset(edits, tokenizer, "new"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
