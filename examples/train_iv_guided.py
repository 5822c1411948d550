"""Fine-tune a causal LM on new facts with IV-guided training: the IV of an ability to keep is
added early in training (annealed to 0) and a KL term keeps the outputs close to the
IV-intervened original model.

    ivtrainer extract-iv --model default --task antonym --out antonym-iv
    python examples/train_iv_guided.py --instruction_vectors antonym-iv --output_dir out/iv \\
        --num_train_epochs 3 --learning_rate 5e-5
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml examples/train_iv_guided.py \\
        --model meta-llama/Llama-2-7b-hf --data counterfact.json --instruction_vectors my-7b-iv \\
        --output_dir out/iv --bf16 --gradient_checkpointing --per_device_train_batch_size 4

The same script as train_plain.py with IVGuidedTrainer and IVGuidedConfig (every IV and KL knob is
a command-line flag: --kl_weight, --iv_schedule, --kl_positions, ...).
"""

from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, HfArgumentParser

from ivtrainer import IVGuidedConfig, IVGuidedTrainer, load_model
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
    script, args = HfArgumentParser((ScriptArguments, IVGuidedConfig)).parse_args_into_dataclasses()
    model, tokenizer = load_model(script.model)  # after the arguments, so that ZeRO-3 loads it sharded
    edits = load_edits(script.data, model=model, tokenizer=tokenizer)[: script.max_edits]
    if script.lora_r:
        model = get_peft_model(
            model, LoraConfig(r=script.lora_r, lora_alpha=2 * script.lora_r, task_type="CAUSAL_LM")
        )
    trainer = IVGuidedTrainer(  # the IVs come from --instruction_vectors
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
