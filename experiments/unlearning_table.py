"""Presence before / after unlearning / after benign fine-tuning for every unlearning preset.

    python -m experiments.unlearning_table [--forget 0] [--finetune 3,4,5] [--retain 1,2] [--steps 1000]

Uses the same problem and defaults as `resurgence theory unlearn` (GD at lr = 1 / lambda_max) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget", default="0")
    parser.add_argument("--finetune", default="3,4,5")
    parser.add_argument(
        "--retain", default=None, help="default: neither erased nor fine-tuned; 'none' = empty"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--optimizer", default="gd")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=8)
    parser.add_argument("--num-concepts", type=int, default=6)
    parser.add_argument("--num-levels", type=int, default=10)
    parser.add_argument("--common-component", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=None, help="comma-separated subset of the presets")
    args = parser.parse_args(argv)

    from experiments.cli_theory_unlearn import _int_list, run_unlearn
    from theory.unlearning import METHOD_NAMES

    methods = args.methods.split(",") if args.methods else METHOD_NAMES
    forget = _int_list(args.forget, "forget")
    print(
        f"d={args.dim}, m={args.embed_dim}, K={args.num_concepts}, L={args.num_levels}, "
        f"rho_c={args.common_component}, seed={args.seed}, forget={forget}, finetune={args.finetune}, "
        f"retain={args.retain or 'neither erased nor fine-tuned'}, {args.optimizer} for {args.steps} steps\n"
    )
    print(
        "| method | presence pretrained | unlearned | after FT | rho(T) | predicted rho(T) | max retained change |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in methods:
        rep = run_unlearn(
            method=name,
            forget=forget,
            finetune=_int_list(args.finetune, "finetune"),
            retain=_int_list(args.retain, "retain"),
            steps=[0, args.steps],
            lr=args.lr,
            optimizer=args.optimizer,
            finetune_params="all",
            dim=args.dim,
            embed_dim=args.embed_dim,
            num_concepts=args.num_concepts,
            num_levels=args.num_levels,
            common_component=args.common_component,
            seed=args.seed,
            guidance_scale=1.0,
            num_samples=4096,
        )
        pres = rep.presence.mean(axis=1)
        others = [k for k in range(rep.self_presence.shape[1]) if k not in rep.forget]
        change = abs(rep.self_presence[1] - rep.self_presence[0])[others].max()
        print(
            f"| {name} | {pres[0]:.3f} | {pres[1]:.3f} | {pres[-1]:.3f} | {rep.rho[-1]:.3f} | "
            f"{rep.predicted_rho[-1]:.3f} | {change:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
