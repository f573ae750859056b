"""The `snakes` command line (also `python -m snakes_lib`): train, generate, data generate, bench, demo.

Hand-written (not exported from a notebook). Subcommands owned by other modules register themselves through
`add_*_command(subparsers)`; the heavy modules (torch, the trainer) are imported only when a command runs."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Optional, Sequence

DEMO_PROMPT = "Once upon a time, there lived a baby girl named Maia."

# flags that take a list of values
_LIST_FIELDS = {"data", "include", "exclude"}
# flags with a fixed set of values
_CHOICES = {"parallel": ("ddp", "fsdp"), "sampler": ("stream", "step")}
# fields that are not flags of `snakes train` (set otherwise, or not meant for the command line)
_HIDDEN_FIELDS = {"preset", "model_config"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# the range of each numeric flag of `snakes train` (lowest, highest, lowest excluded); ints default to 0 or more,
# floats to a finite 0 or more. Checked when the command line is read, so the message names the flag.
_RANGES = {"batch_size": (1,), "grad_accum": (1,), "seq_len": (1,), "max_steps": (1,), "eval_batches": (1,),
           "log_every": (1,), "keep_checkpoints": (1,), "ce_chunk_rows": (1,), "vocab_size": (1,), "chunk_size": (1,),
           "lr_decay_steps": (1,), "stop_at": (1,), "lr": (0, None, True), "max_minutes": (0, None, True),
           "val_fraction": (0, 1), "beta1": (0, 1), "beta2": (0, 1), "decay_fraction": (0, 1)}


def _number(name: str, typ: type):
    from snakes_lib.utils import float_flag, int_flag
    lo, hi, lo_open = (_RANGES.get(name, (0,)) + (None, False))[:3]
    if typ is int:
        return int_flag(lo) if hi is None else int_flag(lo, hi)
    return float_flag(lo, float("inf") if hi is None else hi, lo_open=bool(lo_open))


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (default None = the preset's value)."""
    from snakes_lib.presets import TrainConfig, PRESET_NAMES, MODEL_SIZES, SCHEDULES
    p.add_argument("--preset", default="auto", choices=PRESET_NAMES,
                   help="VRAM preset: cpu, 8gb ... 80gb, or auto (reads the GPU's memory; cpu without one)")
    helps = {
        "data": "files or folders of text (default: the bundled corpus)",
        "out": "run directory (default runs/default)",
        "max_steps": "optimizer steps in total, across resumes (the schedule's length)",
        "schedule": "learning rate after warmup: cosine (default) or wsd (warmup-stable-decay: a run can be "
                    "extended exactly with --resume --max-steps before its decay phase)",
        "decay_fraction": "wsd: decay over this last fraction of --max-steps (default 0.2)",
        "stop_at": "pause at step N with a checkpoint, the schedule unchanged; --resume continues it",
        "lr_decay_steps": "where the schedule reaches --min-lr (default --max-steps; a cosine keeps the first run's)",
        "model_size": f"one of {', '.join(MODEL_SIZES)} (default: the preset's)",
        "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps",
        "precision": "auto, fp32, bf16 or fp16",
        "resume": "continue the run in --out from its newest good checkpoint",
        "progress": "progress bar and messages (--no-progress for logs)",
        "parallel": "under torchrun: ddp (a replica per GPU; the default) or fsdp (weights, gradients and AdamW "
                    "state sharded; the large presets' choice)",
        "sampler": "how batches are drawn: stream (one random stream; one process's default) or step (a function "
                   "of seed, step and rank; the default under torchrun); fixed when a run starts",
        "doc_reset": "packed documents: each one read as if alone, the state reset at <|endoftext|> (default on; "
                     "--no-doc-reset reads across them, as runs from before this option did); fixed when a run starts",
        "cuda_graph": "record each optimizer step as one CUDA graph and replay it (CUDA, one process, bf16 or "
                      "fp32; no --compile): the GPU no longer waits for Python to launch kernels",
        "batch_size": "micro-batch per process (under torchrun the global batch is this x --grad-accum x ranks)",
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name in _HIDDEN_FIELDS:
            continue
        default = f.default
        h = helps.get(f.name, f"(preset default: {default})" if default is not None else None)
        if f.name in _LIST_FIELDS:
            p.add_argument(_flag(f.name), nargs="+", default=None, metavar="PATH" if f.name == "data" else "GLOB",
                           help=h)
        elif isinstance(default, bool) or f.name == "doc_reset":
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.name == "schedule":
            p.add_argument(_flag(f.name), default=None, choices=SCHEDULES, help=h)
        elif f.name in _CHOICES:
            p.add_argument(_flag(f.name), default=None, choices=_CHOICES[f.name], help=helps[f.name])
        elif f.name in ("lr_decay_steps", "chunk_size", "stop_at"):
            p.add_argument(_flag(f.name), type=_number(f.name, int), default=None, metavar="N", help=h)
        elif f.name == "cache_dir":
            p.add_argument(_flag(f.name), default=None, metavar="DIR", help="token cache (default ~/.cache/snakes/tokens)")
        elif f.name == "max_minutes":
            p.add_argument(_flag(f.name), type=_number(f.name, float), default=None, metavar="M",
                           help="stop after M minutes of training")
        else:
            typ = type(default) if default is not None else str
            typ = _number(f.name, typ) if typ in (int, float) else typ
            p.add_argument(_flag(f.name), type=typ, default=None, metavar=f.name.split("_")[-1].upper(), help=h)
    p.add_argument("--model-config", default=None, metavar="JSON",
                   help='extra model config as JSON, e.g. \'{"n_layer": 2}\'')


def config_from_args(args: argparse.Namespace):
    import json
    from snakes_lib.presets import TrainConfig, resolve_preset
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)
                 if f.name not in _HIDDEN_FIELDS}
    if getattr(args, "model_config", None):
        try:
            overrides["model_config"] = json.loads(args.model_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-config {args.model_config!r} is not valid JSON ({e}); write an object such "
                             "as '{\"n_layer\": 2}'") from None
        from snakes_lib.presets import check_model_config
        check_model_config(args.model_type or "mamba2", overrides["model_config"])
    from snakes_lib.utils import folder_path, snakes_cache_dir
    folder_path(args.cache_dir, "--cache-dir ") if args.cache_dir else snakes_cache_dir()   # refused before any work
    if overrides.get("resume"):          # the run's identity comes from its checkpoint, unless a flag names another
        run = _run_config(overrides.get("out") or TrainConfig.out)
        overrides = {**{k: v for k, v in run.items() if overrides.get(k) is None}, **{k: v for k, v in overrides.items()
                                                                                 if v is not None}}
    return resolve_preset(args.preset, **overrides)


def _run_config(out: str) -> dict:
    """What a bare --resume takes from the run in `out` (RESUME_FIXED, --lr, --min-lr, --max-steps), from its newest checkpoint;
    {} when there is none (the trainer then says so)."""
    import json
    from pathlib import Path
    from snakes_lib.presets import RESUME_FIXED
    from snakes_lib.runs import find_checkpoint
    try:
        ckpt = find_checkpoint(Path(out), verbose=False) if Path(out).is_dir() else None
        saved = json.loads((ckpt / "trainer_state.json").read_text())["config"] if ckpt else {}
    except Exception:                        # a damaged run: the trainer's own checks explain it
        return {}
    return {k: saved[k] for k in (*RESUME_FIXED, "lr", "min_lr", "max_steps") if k in saved}


def _err(msg: str) -> int:
    print(f"snakes: error: {msg}", file=sys.stderr)
    return 2


def _exit_status(e: BaseException) -> Optional[int]:
    """The one place where errors become exit statuses: errors a user can fix (a flag, a file, a run folder, the
    network, a missing optional package) -> 2, a loss that became NaN -> 3, `data generate` that wrote nothing -> 1;
    None for anything else (a bug: its traceback is shown)."""
    from snakes_lib.runfolder import RunDirError
    from snakes_lib.train import NonFiniteLossError
    from snakes_lib.generate import CacheInterfaceError
    from snakes_lib.datagen import ModelNotFoundError, NothingGeneratedError, OllamaUnavailableError
    from snakes_lib.documents import DatasetUnavailableError
    from snakes_lib.utils import MissingPackageError
    if isinstance(e, NonFiniteLossError):
        return 3
    if isinstance(e, NothingGeneratedError):
        return 1
    fixable = (RunDirError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               CacheInterfaceError, OllamaUnavailableError, ModelNotFoundError, MissingPackageError,
               DatasetUnavailableError)
    return 2 if isinstance(e, fixable) else None


def cmd_train(args) -> int:
    """`snakes train`, in one process or as one rank of a torchrun job (snakes_lib.distributed.ParallelTrainer):
    rank 0 alone prints."""
    import os
    from snakes_lib.distributed import ParallelTrainer
    from snakes_lib.train import train
    cfg = config_from_args(args)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"preset {cfg.preset}: model {cfg.model_size} ({cfg.model_type}), micro-batch {cfg.batch_size} x "
              f"{cfg.grad_accum} accumulation x {cfg.seq_len} tokens, precision {cfg.precision}, "
              f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
              f"CUDA graph {'on' if cfg.cuda_graph else 'off'}, "
              f"chunked CE {'on' if cfg.chunked_ce else 'off'} -> {cfg.out}", flush=True)
    if cfg.cuda_graph:                   # chapter 10d: one process, the step recorded as a CUDA graph
        from snakes_lib.graph_train import GraphedTrainer
        res = train(cfg, trainer_class=GraphedTrainer)
    else:
        res = train(cfg, trainer_class=ParallelTrainer)
    if main_rank:
        _print_result(res)
    return 130 if res.stop_reason == "interrupted" else 0


def _print_result(res) -> None:
    reason = "paused by --stop-at; continue with --resume" if res.stop_reason == "stop_at" else res.stop_reason
    parts = [f"stopped at step {res.step} ({reason})", f"{res.tokens:,} tokens in {res.seconds:.0f} s"]
    if res.train_loss is not None:
        parts.append(f"train loss {res.train_loss:.3f}")
    if res.val_loss is not None:
        parts.append(f"val loss {res.val_loss:.3f} (perplexity {res.val_perplexity:.1f})")
    if res.best_val_loss is not None:
        parts.append(f"best val loss {res.best_val_loss:.3f} at step {res.best_step}")
    print("; ".join(parts))
    print(f"run directory: {res.run_dir} (metrics.jsonl, loss.png, checkpoints/); sample with "
          f"`snakes generate --run {res.run_dir} --prompt \"...\"`")


def _sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    from snakes_lib.generate import generate
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=seed)


def cmd_demo(args) -> int:
    """Train the tiny model on the bundled corpus on the CPU, then continue the story of Maia."""
    from snakes_lib.presets import resolve_preset
    from snakes_lib.runfolder import check_out, is_snakes_run, remove_run
    from snakes_lib.runs import find_checkpoint, load_run
    from snakes_lib.train import train
    out = check_out(args.out)
    if args.fresh:                           # deletes a snakes run's own files, never a folder snakes did not make
        left = remove_run(out, "snakes demo --fresh")
        if left:
            print(f"--fresh: kept {', '.join(left)} in {out} (not written by snakes)")
    resume = is_snakes_run(out) and find_checkpoint(out, verbose=False) is not None
    if resume:
        print(f"{out} holds an earlier demo run: continuing it (pass --fresh to start over)")
    cfg = resolve_preset("cpu", out=str(out), device=args.device, max_steps=args.max_steps,
                         max_minutes=args.max_minutes, resume=resume, seed=args.seed, **DEMO_OVERRIDES)
    print(f"snakes demo: training the tiny Mamba-2 on the bundled corpus ({cfg.max_steps} steps of "
          f"{cfg.batch_size} x {cfg.seq_len} tokens, at most {cfg.max_minutes} min) -> {out}", flush=True)
    t0 = time.perf_counter()
    res = train(cfg)
    _print_result(res)
    model, tokenizer = load_run(out)
    print(f"\nprompt: {args.prompt}\n" + "-" * 60)
    text = _sample(model, tokenizer, args.prompt, args.max_new_tokens, seed=args.seed)
    print(args.prompt + text)
    print("-" * 60)
    val = f"{res.best_val_loss:.3f}" if res.best_val_loss is not None else "n/a"
    print(f"final val loss {res.val_loss if res.val_loss is None else round(res.val_loss, 3)} "
          f"(best {val}); demo took {time.perf_counter() - t0:.0f} s")
    return 0


# the demo's settings over the cpu preset: small batches, many steps, a time budget
DEMO_OVERRIDES = dict(model_size="tiny", batch_size=16, seq_len=256, eval_every=100, eval_batches=8,
                      checkpoint_every=200, warmup_steps=50, lr=3e-3, min_lr=3e-4)


def cmd_bench(args) -> int:
    from snakes_lib.bench import memory_main
    if args.what != "memory":
        return _err(f"unknown benchmark {args.what!r}; available: memory")
    return memory_main((["--device", args.device] if args.device else []) + (["--quick"] if args.quick else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snakes", description="Why did it have to be snakes? Train and run "
                                     "Mamba-2 language models built from scratch in the snakes course.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (presets for CPUs and 8-80 GB GPUs)",
                       description="Train a language model on folders of text. Every preset value can be "
                                   "overridden by its flag.")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    from snakes_lib.datagen import add_data_command            # the modules that own these subcommands add them
    from snakes_lib.generate import add_generate_command
    from snakes_lib.interop import add_export_command
    add_generate_command(sub)
    add_data_command(sub)
    add_export_command(sub)

    p = sub.add_parser("bench", help="benchmarks (memory: peak GPU memory of every preset)")
    p.add_argument("what", nargs="?", default="memory", choices=["memory"])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny settings, one step each")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="train the tiny model on the bundled corpus on CPU, then tell a story",
                       description="The main job: trains the tiny Mamba-2 on the bundled corpus (a few minutes on a "
                                   "laptop CPU), prints the validation loss and a sample.")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--max-minutes", type=float, default=6.5, help="time budget for training (default 6.5)")
    p.add_argument("--device", default="cpu", help="cpu (default) or auto/cuda/mps")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the story to continue")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--fresh", action="store_true", help="delete an earlier demo run and start over")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import os
    # fewer, growable CUDA memory segments: less fragmentation, a lower peak (read when CUDA starts)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets "?", not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if hasattr(sys.stdin, "reconfigure"):    # bytes that are not UTF-8 reach the prompt as escapes, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:           # RunInterrupted says what was kept; partial files are already removed
        print(f"snakes: {e}" if str(e) else "snakes: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:                  # `snakes generate ... | head -c 1`: the reader left; so do we, quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141                           # 128 + SIGPIPE, as shell tools report it
    except Exception as e:
        status = _exit_status(e)
        if status is None or os.environ.get("SNAKES_DEBUG"):
            raise                            # a bug (or SNAKES_DEBUG=1): the full traceback
        _err(str(e))
        return status


if __name__ == "__main__":
    sys.exit(main())
