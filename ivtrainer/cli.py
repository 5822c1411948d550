"""The ``ivtrainer`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ivtrainer.errors import IVTrainerError
from ivtrainer.version import __version__

__all__ = ["main"]


def _lm_eval_tasks(args: argparse.Namespace) -> int:
    from ivtrainer.evaluation.lm_eval_tasks import lm_eval_tasks_path

    print(lm_eval_tasks_path())
    return 0


def _info(args: argparse.Namespace) -> int:
    from ivtrainer.modeling.architectures import get_layout
    from ivtrainer.modeling.loading import load_model

    start = time.perf_counter()
    model, _ = load_model(args.model)
    seconds = time.perf_counter() - start
    layout = get_layout(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model          {args.model} ({model.config._name_or_path})")
    print(f"class          {type(model).__name__}, {n_params / 1e6:.1f}M parameters, {model.dtype}")
    print(layout.describe())
    print(f"load time      {seconds:.2f} s")
    return 0


def _edit_layer(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index or 'auto', got {value!r}") from None


def _extract_iv(args: argparse.Namespace) -> int:
    from ivtrainer.datasets.tasks import load_examples
    from ivtrainer.hub.push import check_push_target
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.steering.head_set import HeadSet
    from ivtrainer.steering.icl import check_extraction_sizes
    from ivtrainer.steering.instruction_vector import extract_instruction_vector
    from ivtrainer.steering.vector_evaluation import split_pairs
    from ivtrainer.utils.outputs import atomic_dir, check_output_dir

    # Everything that can be checked without the model is checked before loading it.
    if args.batch_size < 1:
        raise IVTrainerError(f"--batch-size must be >= 1, got {args.batch_size}")
    examples = load_examples(args.task)
    held_out: list = []
    if args.eval_split is not None:
        examples, held_out = split_pairs(examples, args.eval_split, seed=args.seed)
    check_extraction_sizes(examples, n_shots=args.n_shots, n_heads=args.n_heads, source=args.task)
    out = check_output_dir(args.out, inputs=[args.model, args.task, args.heads], overwrite=args.overwrite)
    head_set = HeadSet.from_pretrained(args.heads) if args.heads else None
    if args.push_to_hub:
        check_push_target(args.push_to_hub)

    model, tokenizer = load_model(args.model)
    iv = extract_instruction_vector(
        model,
        tokenizer,
        args.task if args.task in _builtin_tasks() and not held_out else examples,
        n_heads=args.n_heads,
        n_shots=args.n_shots,
        n_mean_prompts=args.n_mean_prompts,
        n_cie_prompts=args.n_cie_prompts,
        method=args.method,
        calibrate=args.calibrate,
        edit_layer=args.edit_layer,
        strength=args.strength,
        name=args.name or (args.task if args.task in _builtin_tasks() else Path(args.task).stem),
        heads=head_set,
        chat_template=args.chat_template,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
    )
    evaluation = None
    if held_out:
        evaluation = iv.evaluate(
            model, tokenizer, held_out, shots=(0, 5), demonstrations=examples, progress=True
        )
        iv.metrics["evaluation"] = evaluation.as_dict()
    with atomic_dir(out, marker={"command": "extract-iv"}) as tmp:
        iv.save_pretrained(tmp)
        if args.plot:
            from ivtrainer.evaluation.plotting import plot_cie

            title = f"CIE, {iv.task or 'task'} ({args.method})"
            plot_cie(iv.cie, tmp / "cie_heatmap.png", heads=iv.heads, title=title)
            if "calibration" in iv.metrics:
                from ivtrainer.evaluation.plotting import plot_calibration

                plot_calibration(iv.metrics["calibration"], tmp / "calibration_heatmap.png")
    print(f"top {len(iv.heads)} heads (layer, head: mean CIE):")
    for (layer, head), score in zip(iv.heads, iv.head_scores, strict=True):
        print(f"  L{layer:<3d} H{head:<3d} {score:+.4f}")
    print(
        f"edit layer {iv.edit_layer} of {iv.n_layers}, strength {iv.strength:g}; vector norm {iv.vector.norm():.3f}"
    )
    calibration = iv.metrics.get("calibration")
    if calibration:
        print(
            f"calibrated on {calibration['n_prompts']} extraction pairs: zero-shot accuracy "
            f"{calibration['base_accuracy']:.2f} -> {calibration['accuracy']:.2f} with the vector "
            f"({calibration['n_heads']} heads, layer {calibration['edit_layer']}, x{calibration['strength']:g})"
        )
    if evaluation is not None:
        print(evaluation.table())
    plots = " (with cie_heatmap.png" + (", calibration_heatmap.png)" if "calibration" in iv.metrics else ")")
    print(f"saved to {args.out}" + (plots if args.plot else ""))
    if args.push_to_hub:
        print(f"pushed: {iv.push_to_hub(args.push_to_hub)}")
    return 0


def _forget(args: argparse.Namespace) -> int:
    from ivtrainer.arithmetic.forget import forget
    from ivtrainer.arithmetic.subtraction import check_lambdas
    from ivtrainer.hub.push import check_push_target, push_folder
    from ivtrainer.utils.outputs import MARKER

    # The flags' own rules, named as flags; forget() checks everything else before any work.
    if bool(args.adapter) == bool(args.finetuned):
        raise IVTrainerError("pass either --adapter (one or more) or --finetuned, not both and not neither")
    n = len(args.adapter) if args.adapter else 1
    lams = check_lambdas(args.lam * n if len(args.lam) == 1 else args.lam, n)
    if any(lam < 0 for lam in lams):
        raise IVTrainerError(
            f"--lam must be >= 0 (forget subtracts lambda x delta; 0 changes nothing), got {args.lam}"
        )
    if args.push_to_hub:
        check_push_target(args.push_to_hub)
    result = forget(
        args.base,
        args.out,
        adapters=args.adapter,
        finetuned=args.finetuned,
        lam=lams,
        overwrite=args.overwrite,
        check_base_model=not args.no_check_base_model,
    )
    delta = f"adapter(s) {args.adapter}" if args.adapter else f"task vector {args.finetuned} - {args.base}"
    print(f"wrote {args.out}: {args.base} - lambda {lams} x {delta}")
    print(
        f"||lambda x delta|| = {result.delta_norm:.4g}, {result.relative:.3g} of the norm of the "
        f"{result.tensors} weight tensors it changed"
    )
    if args.push_to_hub:
        import shutil

        def copy(folder: Path) -> None:
            shutil.copytree(result.path, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER))

        print(f"pushed: {push_folder(copy, args.push_to_hub)}")
    return 0


def _evaluate_edits(args: argparse.Namespace) -> int:
    import json

    import torch

    from ivtrainer.datasets.edits import BUILTIN, load_edits
    from ivtrainer.evaluation.edit_metrics import evaluate_edits
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.utils.outputs import atomic_file, check_output_file

    def warn(message: str) -> None:
        print(f"ivtrainer evaluate-edits: warning: {message}", file=sys.stderr)

    # file errors before any load
    records = None if args.data == BUILTIN else load_edits(args.data, on_skip=warn)
    to_file = args.json not in (None, "-")
    if to_file:
        json_out = check_output_file(
            args.json, inputs=[args.data, args.model, args.base], overwrite=args.overwrite
        )
    if args.threads is not None:
        if args.threads < 1:
            raise IVTrainerError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise IVTrainerError(
            f"--device {args.device!r} is not a device; use cpu, cuda, cuda:N or mps"
        ) from None
    base = tokenizer = None
    if args.base:
        base, tokenizer = load_model(args.base)
        base.to(device)
    model, model_tokenizer = load_model(args.model)
    model.to(device)
    tokenizer = tokenizer or model_tokenizer
    if records is None:  # the facts the unedited model knows
        records = load_edits(BUILTIN, model=base if base is not None else model, tokenizer=tokenizer)
    scores = evaluate_edits(
        model, tokenizer, records, base_model=base, batch_size=args.batch_size, progress=True
    )
    text = json.dumps({"n_edits": len(records), **scores}, indent=2) + "\n"
    if args.json == "-":  # machine-readable stdout: the JSON alone
        sys.stdout.write(text)
        return 0
    print(f"{len(records)} edits, {args.model}" + (f" vs unedited {args.base}" if base is not None else ""))
    for name in ("reliability", "generality", "locality"):
        value = f"{100 * scores[name]:.1f}" if name in scores else "n/a (pass --base, the unedited model)"
        print(f"{name:<12} {value}")
    if to_file:
        with atomic_file(json_out) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.json}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from ivtrainer.datasets.tasks import load_examples
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.steering.dynamics import analyze_iv, save_analysis
    from ivtrainer.steering.instruction_vector import InstructionVector
    from ivtrainer.utils.outputs import check_output_dir

    out = check_output_dir(
        args.out, inputs=[args.model, args.iv, args.base, args.task], overwrite=args.overwrite
    )
    iv = InstructionVector.from_pretrained(args.iv)
    examples = None if args.task is None else load_examples(args.task)
    model, tokenizer = load_model(args.model)
    base = load_model(args.base)[0] if args.base else None
    result = analyze_iv(model, tokenizer, iv, examples=examples, base_model=base, n_prompts=args.n_prompts)
    save_analysis(result, out, plot=not args.no_plot, overwrite=args.overwrite)
    print(
        f"task {result.task or args.task}: IV cosine (before vs after) {result.cosine:.3f}, "
        f"head overlap {result.head_overlap:.0%} ({len(result.shared_heads)}/{len(iv.heads)})"
    )
    for name, values in result.evaluation.items():
        print(f"{name:<11} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print(f"wrote {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ivtrainer.demo import DemoPlan, run_demo

    lm_eval = tuple(t.strip() for t in (args.lm_eval_tasks or "").split(",") if t.strip())
    plan = (DemoPlan.quick if args.quick else DemoPlan)(
        seed=args.seed, iv_task=args.task, lm_eval_tasks=lm_eval, lm_eval_limit=args.lm_eval_limit
    )
    run_demo(args.model, args.out, plan=plan, quick=args.quick, overwrite=args.overwrite)
    return 0


def _continual(args: argparse.Namespace) -> int:
    from ivtrainer.continual.run_sequence import QUICK, run_sequence
    from ivtrainer.continual.sequence_tasks import ORDERS

    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    else:
        tasks = ORDERS["quick" if args.quick else args.order]
    settings = dict(QUICK) if args.quick else {}
    if args.lm_eval_tasks:
        settings["lm_eval_tasks"] = tuple(t.strip() for t in args.lm_eval_tasks.split(",") if t.strip())
    if args.repair:
        settings["repair"] = True
    for name in (
        "epochs",
        "n_train",
        "n_test",
        "n_icl",
        "icl_demos",
        "learning_rate",
        "replay_fraction",
        "kl_scale",
        "teacher_strength",
        "eval_split",
        "iv_heads",
        "lm_eval_limit",
        "teacher",
        "teacher_top_k",
    ):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    run_sequence(
        tasks,
        out=args.out,
        method=args.method,
        model=args.model,
        lora=not args.full,
        seed=args.seed,
        **settings,
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _extract_heads(args: argparse.Namespace) -> int:
    from ivtrainer.datasets.tasks import load_examples
    from ivtrainer.hub.push import check_push_target
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.steering.head_set import extract_head_set
    from ivtrainer.steering.icl import check_extraction_sizes
    from ivtrainer.utils.outputs import atomic_dir, check_output_dir

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else _builtin_tasks()
    if not tasks:
        raise IVTrainerError("--tasks is empty: pass comma-separated task names or files")
    for task in tasks:  # every file checked before the model loads
        check_extraction_sizes(load_examples(task), n_shots=args.n_shots, source=task)
    out = check_output_dir(args.out, inputs=[args.model, *tasks], overwrite=args.overwrite)
    if args.push_to_hub:
        check_push_target(args.push_to_hub)
    model, tokenizer = load_model(args.model)
    head_set = extract_head_set(
        model,
        tokenizer,
        tasks,
        n_shots=args.n_shots,
        n_mean_prompts=args.n_mean_prompts,
        n_cie_prompts=args.n_cie_prompts,
        method=args.method,
        seed=args.seed,
        progress=True,
    )
    with atomic_dir(out, marker={"command": "extract-heads"}) as tmp:
        head_set.save_pretrained(tmp)
    top = ", ".join(
        f"L{layer}H{head} {float(head_set.cie[layer, head]):+.4f}" for layer, head in head_set.top(10)
    )
    print(f"top heads by mean CIE over {len(tasks)} tasks: {top}")
    print(f"saved to {args.out}")
    if args.push_to_hub:
        print(f"pushed: {head_set.push_to_hub(args.push_to_hub)}")
    return 0


def _builtin_tasks() -> list[str]:
    from ivtrainer.datasets.tasks import list_tasks

    return list_tasks()


_OVERWRITE_HELP = "replace a non-empty --out, if an earlier ivtrainer run wrote it (never other folders)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivtrainer",
        description="Instruction-vector-guided training and F-Learning for Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"ivtrainer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the whole story on the default model in minutes: IV, IV-guided training, F-Learning",
        description="Offline, on the default model (SmolLM2-135M-Instruct) or --model: extract a built-in "
        "task's instruction vector (top heads, CIE heatmap); fine-tune with LoRA on a new task plainly and "
        "IV-guided (new-task accuracy and held-out abilities before and after, plot); update a handful of "
        "facts with plain fine-tuning and F-Learning (Reliability, Generality, Locality). Writes the IV, "
        "adapters, tables (JSON, Markdown) and plots to --out. About 5 minutes on 2 CPU cores; --quick, 2-3.",
    )
    demo.add_argument(
        "--model", default="default", help="'default', a Hub id, a local folder or a .gguf file"
    )
    demo.add_argument("--out", default="ivtrainer-demo", help="output folder (default: ./ivtrainer-demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller run of about 2 minutes")
    demo.add_argument("--task", default="antonym", help="the built-in task whose IV guides training")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--lm-eval-tasks",
        help="lm-evaluation-harness tasks scored with the held-out abilities in stage 2 (pip install "
        "'ivtrainer[eval]'), e.g. ivtrainer_abilities or hellaswag",
    )
    demo.add_argument(
        "--lm-eval-limit", type=int, default=50, help="lm-eval: documents per task (default 50)"
    )
    demo.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    demo.set_defaults(func=_demo)

    co = sub.add_parser(
        "continual",
        help="continual instruction tuning: train a task sequence in turn, score every task after every stage",
        description="Train tasks in order (LoRA: a new adapter per task over the merged earlier ones; or --full) "
        "with plain fine-tuning, replay, a KL anchor or IV guidance (each task's own IV, FvForgetting's recipe), "
        "scoring every task and the held-out abilities after every stage. Writes results.json (accuracy matrix, "
        "AP, BWT, FWT, forgetting), results.md and two plots to --out; run the same command again to continue an "
        "interrupted run. --quick: three tasks on the default model in about 3 minutes.",
    )
    co.add_argument(
        "--tasks",
        help="comma-separated built-in sequence tasks or JSON/JSONL files of input/output pairs "
        "(default: the built-in order, see --order)",
    )
    co.add_argument("--order", default="order1", choices=["order1", "order2"], help="the built-in task order")
    co.add_argument(
        "--method",
        default="iv-guided",
        choices=["plain", "replay", "kl-anchor", "iv-guided", "iv-guided-replay"],
    )
    co.add_argument(
        "--out", required=True, help="output folder (a new one, or an interrupted run's to continue)"
    )
    co.add_argument("--quick", action="store_true", help="three tasks, small splits: about 3 minutes")
    co.add_argument("--model", default="default", help="'default', a Hub id, a local folder or a .gguf file")
    mode = co.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="LoRA r8 on q_proj, v_proj per task (the default)")
    mode.add_argument("--full", action="store_true", help="full fine-tuning")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--epochs", type=float, help="epochs per task (default 2)")
    co.add_argument("--n-train", type=int, help="training rows per task (default: all of its train split)")
    co.add_argument("--n-test", type=int, help="test rows per task (default: all)")
    co.add_argument("--n-icl", type=int, help="5-shot prompts per held-out ability (default 24)")
    co.add_argument(
        "--icl-demos",
        choices=["fixed", "per-query"],
        help="held-out abilities: the same five demonstrations before every query, computed once (default), or "
        "drawn per query (about 4x the evaluation time)",
    )
    co.add_argument(
        "--lm-eval-tasks",
        help="comma-separated lm-evaluation-harness tasks scored after every stage too (pip install "
        "'ivtrainer[eval]'), e.g. ivtrainer_abilities or hellaswag,arc_easy",
    )
    co.add_argument("--lm-eval-limit", type=int, help="lm-eval: documents per task (default: all)")
    co.add_argument("--learning-rate", type=float, help="default 5e-4 with LoRA, 2e-5 full")
    co.add_argument(
        "--replay-fraction", type=float, help="replay: share of each earlier task's rows (default 0.1)"
    )
    co.add_argument(
        "--kl-scale", type=float, help="kl-anchor, iv-guided: a factor on the recipe's KL weights (default 1)"
    )
    co.add_argument(
        "--teacher-strength",
        type=float,
        help="iv-guided: the teacher's IV strength, times the IV's own (default 1)",
    )
    co.add_argument(
        "--eval-split",
        choices=["test", "validation"],
        help="the split every stage is scored on (default test; validation: to choose settings)",
    )
    co.add_argument(
        "--iv-heads", help="iv-guided: a saved head set for the own-task IVs (`ivtrainer extract-heads`)"
    )
    co.add_argument(
        "--teacher",
        choices=["live", "precomputed"],
        help="kl-anchor, iv-guided: the teacher run at every step (default), or once before each stage and stored",
    )
    co.add_argument(
        "--teacher-top-k",
        type=int,
        help="with --teacher precomputed: tokens stored per position (64); 0: hidden states, exact",
    )
    co.add_argument(
        "--repair",
        action="store_true",
        help="IV repair: capture each task's IV right after its stage and, at the end, add it back to its "
        "prompts (the task given, and routed from the prompt; strengths chosen on validation rows); extra "
        "results rows, no retraining (a LoRA run made without it can be scored again with it)",
    )
    co.set_defaults(func=_continual)

    info = sub.add_parser(
        "info",
        help="load a model and show the attention modules ivtrainer hooks",
        description="Load a model (default: the embedded SmolLM2-135M-Instruct) and print its "
        "architecture, layers x heads, head_dim and the attention output projections ivtrainer hooks.",
    )
    info.add_argument(
        "--model", default="default", help="'default', a Hub id, a local folder or a .gguf file"
    )
    info.set_defaults(func=_info)

    lm = sub.add_parser(
        "lm-eval-tasks",
        help="print the folder of ivtrainer's lm-evaluation-harness tasks (for lm_eval --include_path)",
        description="Print the folder holding the package's held-out abilities as lm-eval tasks: "
        'lm_eval --model hf --model_args pretrained=M --include_path "$(ivtrainer lm-eval-tasks)" '
        "--tasks ivtrainer_abilities (ivtrainer_facts_instruction: add --apply_chat_template).",
    )
    lm.set_defaults(func=_lm_eval_tasks)

    ex = sub.add_parser(
        "extract-iv",
        help="extract a task's instruction vector by causal mediation analysis",
        description="Find the attention heads that carry a task (causal mediation, Todd et al.) and save "
        "their summed outputs as an instruction vector (safetensors + JSON + model card).",
    )
    ex.add_argument("--model", default="default", help="'default', a Hub id, a local folder or a .gguf file")
    ex.add_argument(
        "--task", required=True, help="a built-in task name or a JSON/JSONL file of {input, output}"
    )
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--method", choices=["exact", "atp"], default="exact")
    ex.add_argument(
        "--n-heads",
        type=int,
        default=None,
        help="heads summed (default: 5, 10 or 20 by calibration; 10 without)",
    )
    ex.add_argument("--n-shots", type=int, default=10)
    ex.add_argument("--n-mean-prompts", type=int, help="default 100; 25 with --heads")
    ex.add_argument("--n-cie-prompts", type=int, default=25)
    ex.add_argument(
        "--edit-layer",
        type=_edit_layer,
        default=None,
        help="layer index, or 'auto' (default: chosen by calibration; L // 3 without)",
    )
    ex.add_argument(
        "--strength",
        type=float,
        default=None,
        help="vector strength (default: chosen by calibration; 1 without)",
    )
    ex.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="the papers' fixed choice (10 heads, layer L // 3, strength 1) instead of choosing the heads, "
        "layer and strength on extraction pairs",
    )
    ex.add_argument(
        "--eval-split",
        type=float,
        metavar="FRACTION",
        help="hold out this fraction of the pairs (e.g. 0.33): never used for extraction, then scored zero-shot, "
        "zero-shot + IV and 5-shot; the table goes into the artifact and its card",
    )
    ex.add_argument("--name", help="the task's name in the artifact (default: the task name or file stem)")
    ex.add_argument(
        "--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template"
    )
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--batch-size", type=int, default=16)
    ex.add_argument(
        "--plot",
        action="store_true",
        help="write the layers x heads CIE heatmap (cie_heatmap.png) and the calibration's layer x strength "
        "accuracy heatmap (calibration_heatmap.png)",
    )
    ex.add_argument("--push-to-hub", metavar="REPO", help="also upload the vector to this Hub repo")
    ex.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    ex.add_argument(
        "--heads",
        metavar="HEAD_SET",
        help="a head set (folder or Hub id, from extract-heads): no CIE for this task",
    )
    ex.set_defaults(func=_extract_iv)

    hs = sub.add_parser(
        "extract-heads",
        help="rank the model's heads by causal effect averaged over many tasks (a universal head set)",
        description="Measure every head's causal indirect effect on each task and save the mean as a head set "
        "(safetensors + JSON + model card); extract-iv --heads then needs only a task's mean activations.",
    )
    hs.add_argument("--model", default="default", help="'default', a Hub id, a local folder or a .gguf file")
    hs.add_argument(
        "--tasks",
        default=None,
        help="comma-separated built-in task names or JSON/JSONL files (default: every built-in task)",
    )
    hs.add_argument("--out", required=True, help="output folder")
    hs.add_argument("--method", choices=["exact", "atp"], default="exact")
    hs.add_argument("--n-shots", type=int, default=10)
    hs.add_argument("--n-mean-prompts", type=int, default=100)
    hs.add_argument("--n-cie-prompts", type=int, default=25)
    hs.add_argument("--seed", type=int, default=0)
    hs.add_argument("--push-to-hub", metavar="REPO", help="also upload the head set to this Hub repo")
    hs.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    hs.set_defaults(func=_extract_heads)

    fo = sub.add_parser(
        "forget",
        help="subtract lambda x a LoRA adapter or a full fine-tuning delta from a model (F-Learning)",
        description="Write base - lambda * delta, where delta is a LoRA adapter's update or "
        "finetuned - base (Ni et al., 2024: forgetting before learning).",
    )
    fo.add_argument("--base", required=True, help="'default', a Hub id or a local folder")
    fo.add_argument("--adapter", action="append", help="a LoRA adapter folder or Hub id (repeat for several)")
    fo.add_argument("--finetuned", help="a full fine-tune of --base (Hub id or folder)")
    fo.add_argument(
        "--lam", type=float, action="append", required=True, help="lambda (repeat: one per adapter)"
    )
    fo.add_argument("--out", required=True, help="output model folder")
    fo.add_argument(
        "--no-check-base-model",
        action="store_true",
        help="subtract an adapter whose adapter_config.json names another base model (same shapes)",
    )
    fo.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    fo.add_argument("--push-to-hub", metavar="REPO")
    fo.set_defaults(func=_forget)

    ev = sub.add_parser(
        "evaluate-edits",
        help="Reliability, Generality and Locality of a knowledge-edited model (EasyEdit semantics)",
        description="Teacher-forced token accuracy of the new targets after the edit prompts (Reliability) "
        "and their paraphrases (Generality), and agreement with the unedited --base model on unrelated "
        "prompts (Locality).",
    )
    ev.add_argument("--model", required=True, help="the edited model: 'default', a Hub id or a folder")
    ev.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (counterfactuals built from the facts the unedited model knows), or a JSON/JSONL "
        "file in CounterFact (EasyEdit) or ZsRE (MEND) format",
    )
    ev.add_argument("--base", help="the unedited model, for Locality (and for building the built-in set)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument(
        "--device", help="where to run: cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)"
    )
    ev.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    ev.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="print the scores as JSON (to stdout, or to FILE when given)",
    )
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json FILE")
    ev.set_defaults(func=_evaluate_edits)

    an = sub.add_parser(
        "analyze",
        help="what fine-tuning did to an instruction vector (IV dynamics)",
        description="Re-extract an instruction vector on a fine-tuned model and compare it with the original "
        "(cosine, head overlap, CIE change heatmap); report the edit layer's hidden-state similarity to the IV "
        "next to task accuracy on held-out prompts.",
    )
    an.add_argument("--model", required=True, help="the fine-tuned model: 'default', a Hub id or a folder")
    an.add_argument("--iv", required=True, help="the original instruction vector (folder or Hub id)")
    an.add_argument("--base", help="the model before fine-tuning, to report its similarity and accuracy too")
    an.add_argument("--task", help="the task's pairs if the IV names no built-in task (JSON/JSONL)")
    an.add_argument(
        "--out", required=True, help="output folder (analysis.json, reextracted_iv/, cie_change.png)"
    )
    an.add_argument("--n-prompts", type=int, default=50, help="held-out prompts for similarity and accuracy")
    an.add_argument("--no-plot", action="store_true")
    an.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    an.set_defaults(func=_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except IVTrainerError as exc:
        # Bad input: one line naming the problem and the fix. Anything else is a bug: a traceback.
        if args.debug:
            raise
        print(f"ivtrainer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ivtrainer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
