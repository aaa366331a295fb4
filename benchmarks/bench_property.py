"""Random small architectures through every compression technique and pair of them: the long run of the property
test (issue 22, item 11; the CI test is ``tests/property/test_structure_property.py``).

Each case is a model built from random blocks (residual adds, concatenated branches, a gated ``chunk(2)``, a reshape
before the next layer, a layer used twice, tied weights, a branch on the batch's mean sign, LSTM / GRU, multi-head
attention, Linear and Conv1d + BatchNorm) and one technique or an ordered pair (channel removal at the end or mid-fit,
dead channels, unstructured pruning, low rank, QAT with frozen scales), fitted for 4 optimizer steps in a real
``Trainer.fit`` and judged by the oracle in ``tests/property/structures.py``: refused before the first step with a
named reason, or a final model that runs, equals the masked / factorized model, holds the sparsity reported, and
survives ``save_compressed`` / ``load_compressed`` and ONNX export. Case ``i`` is drawn from
``random.Random(f"{seed}-{i}")``, so ``--only i`` reruns one.

    python benchmarks/bench_property.py                    # 2,000 cases, about 15 minutes on 2 CPU cores (1 thread)
    python benchmarks/bench_property.py --examples 200     # about 2 minutes
    python benchmarks/bench_property.py --only 17 -v       # one case again, with its warnings
    python benchmarks/bench_property.py --quick            # a smoke run: 2 cases

Exits with 1 when a failure (a silent wrong result or a crash) is not one of the known issues listed in
``tests/property/structures.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.property.structures import COMBOS, Case, draw_case, known_issue, run_case

FAILURES = ("wrong", "crash")


def case_of(seed: int, i: int) -> Case:
    rng = random.Random(f"{seed}-{i}")
    return draw_case(lambda options: rng.choice(list(options)), COMBOS)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="how many cases (default 2000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 cases")
    parser.add_argument("--seed", type=int, default=0, help="case i is drawn from random.Random(f'{seed}-{i}')")
    parser.add_argument("--only", type=int, nargs="*", help="run only these case indices")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repros", type=Path, help="write a script reproducing each failure into this folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case and its warnings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    indices = args.only if args.only else range(2 if args.quick else args.examples)
    outcomes: collections.Counter[str] = collections.Counter()
    refusals: collections.Counter[str] = collections.Counter()
    notes: collections.Counter[str] = collections.Counter()
    per_combo: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    failures = []
    known: collections.Counter[str] = collections.Counter()  # failures a known issue explains, by outcome
    issues: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    for i in indices:
        case = case_of(args.seed, i)
        result = run_case(case)
        outcomes[result.outcome] += 1
        per_combo["+".join(case.techniques)][result.outcome] += 1
        if result.outcome.startswith("refused"):
            refusals[f"{result.outcome}: {result.reason}"] += 1
        for note in result.notes:
            notes[note.split(" (")[0]] += 1
        if result.outcome in FAILURES:
            issue = known_issue(case, result)
            known[result.outcome] += issue is not None
            if issue is not None:
                issues[issue.name] += 1
            failures.append({"index": i, "case": repr(case), "outcome": result.outcome, "reason": result.reason,
                             "known_issue": None if issue is None else issue.name})
            print(f"case {i}: {result.outcome.upper()}{'' if issue is None else f' (known: {issue.name})'}: "
                  f"{case!r}\n  {result.reason}", flush=True)
            if args.repros:
                write_repro(args.repros, args.seed, i, case, result.reason)
        if args.verbose:
            print(f"case {i} ({result.seconds:.1f} s): {result.outcome} {result.reason[:200]} {case!r}")
            for w in result.warnings:
                print(f"    warning: {w[:300]}")
        done = sum(outcomes.values())
        if not args.verbose and done % 50 == 0:
            print(f"{done} cases, {time.perf_counter() - start:.0f} s: {dict(outcomes)}", flush=True)
    elapsed = time.perf_counter() - start
    total = sum(outcomes.values())
    refused = sum(v for k, v in outcomes.items() if k.startswith("refused"))
    print(f"\nbench_property: {total} generated models, seed {args.seed}, {elapsed:.0f} s "
          f"({elapsed / max(total, 1):.2f} s per model), torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| outcome | models |\n|---|---|")
    print(f"| generated | {total} |")
    print(f"| refused before step 0 (named reason) | {outcomes['refused']} |")
    print(f"| refused at `remove_at` (named, nothing changed) | {outcomes['refused at remove_at']} |")
    print(f"| passed every check | {outcomes['passed']} |")
    print(f"| silent wrong results (of which known issues) | {outcomes['wrong']} ({known['wrong']}) |")
    print(f"| crashes: after a fit that did not refuse, or not a named refusal (of which known issues) | "
          f"{outcomes['crash']} ({known['crash']}) |")
    if issues:
        print("\n| known issue | failures |\n|---|---|")
        for name, n in issues.most_common():
            print(f"| {name} | {n} |")
    if refusals:
        print("\n| refusal reason | models |\n|---|---|")
        for reason, n in refusals.most_common():
            print(f"| {reason.replace('|', '/')} | {n} |")
    if notes:
        print("\n| check skipped | models |\n|---|---|")
        for note, n in notes.most_common():
            print(f"| {note} | {n} |")
    print("\n| techniques | passed | refused | wrong | crash |\n|---|---|---|---|---|")
    for combo in sorted(per_combo):
        c = per_combo[combo]
        print(f"| {combo} | {c['passed']} | {c['refused'] + c['refused at remove_at']} | {c['wrong']} | "
              f"{c['crash']} |")
    result = {"models": total, "seconds": elapsed, "seed": args.seed, "outcomes": dict(outcomes),
              "refused": refused, "refusals": dict(refusals), "known": dict(known), "issues": dict(issues),
              "notes": dict(notes), "failures": failures,
              "per_combo": {k: dict(v) for k, v in per_combo.items()}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


def write_repro(folder: Path, seed: int, i: int, case: Case, reason: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    (folder / f"case_{seed}_{i}.py").write_text(
        f'"""bench_property case {i} (seed {seed}): {reason.splitlines()[0][:300]}"""\n'
        f"import sys\nsys.path.insert(0, {str(root)!r})\n"
        "from tests.property.structures import *  # noqa: F403\n\n"
        f"result = run_case({case!r})\n"
        "print(result.outcome, result.reason)\nfor w in result.warnings:\n    print('warning:', w)\n")


if __name__ == "__main__":
    found = main()
    sys.exit(1 if any(f["known_issue"] is None for f in found["failures"]) else 0)  # a failure no known issue explains
