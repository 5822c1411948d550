"""trl's SFTTrainer, unchanged, with ivtrainer's callbacks.

    ivtrainer extract-iv --model default --task antonym --out antonym-iv
    python examples/sft_with_callbacks.py --instruction_vectors antonym-iv --output_dir out/sft \
        --num_train_epochs 3 --bf16 false  # SFTConfig trains in bf16 by default: off on a CPU

IVInterventionCallback adds the annealed IV to an unmodified SFTTrainer (the schedule comes from
--iv_schedule, --iv_strength_start, ...). Its KL partner, IVKLCallback, needs logits, which
SFTTrainer's fused LM head never builds: for the full IV-guided loss with trl's data handling,
--kl trains with IVGuidedSFTTrainer instead. The config is an IVGuidedSFTConfig either way: an
SFTConfig with the IV and KL fields, which SFTTrainer ignores.
"""

from dataclasses import dataclass, field

from datasets import Dataset
from transformers import HfArgumentParser
from trl import SFTTrainer

from ivtrainer import IVGuidedSFTConfig, IVGuidedSFTTrainer, load_model
from ivtrainer.callbacks import IVInterventionCallback
from ivtrainer.datasets.edits import load_edits


@dataclass
class ScriptArguments:
    model: str = field(
        default="default", metadata={"help": "'default' (SmolLM2-135M-Instruct), a Hub id or a folder"}
    )
    data: str = field(default="builtin", metadata={"help": "'builtin' or a CounterFact/ZsRE JSON file"})
    kl: bool = field(default=False, metadata={"help": "Train with IVGuidedSFTTrainer (IV + KL) instead."})
    max_edits: int | None = field(default=None, metadata={"help": "Use the first N edits only."})


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, IVGuidedSFTConfig)).parse_args_into_dataclasses()
    model, tokenizer = load_model(script.model)
    edits = load_edits(script.data, model=model, tokenizer=tokenizer)[: script.max_edits]
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": " " + e["target_new"]} for e in edits])
    if script.kl:
        trainer = IVGuidedSFTTrainer(model, args, train_dataset=data, processing_class=tokenizer)
    else:
        trainer = SFTTrainer(
            model,
            args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[IVInterventionCallback(args.instruction_vectors, args.iv_schedule_obj())],
        )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
