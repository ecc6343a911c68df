"""benchmarks/bench_reduction_launches.py's CPU parts: the --grid spec, finding inductor's persistent-reduction
kernel files in a cache directory, the traffic count (each tensor's storage once), and the launch the product's rule
gives each kernel."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_reduction_launches as brl  # noqa: E402


def test_parse_grid_pairs_every_xblock_with_every_warp_count() -> None:
    assert brl.parse_grid("1/2:4/8") == [(1, 4), (1, 8), (2, 4), (2, 8)]
    assert brl.parse_grid("8:16") == [(8, 16)]


@pytest.mark.parametrize("spec, needle", [("1/2", "XBLOCKS:WARPS"), ("1/3:4", "3 is not a power of two"),
                                          ("a:4", "integers"), ("1:0", "0 is not a power of two")])
def test_parse_grid_rejects_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        brl.parse_grid(spec)


def test_find_kernel_files_keeps_persistent_reductions_with_a_harness(tmp_path: Path) -> None:
    harness = "\ndef get_args():\n    return ()\n"
    (tmp_path / "ab").mkdir()
    keep = tmp_path / "ab" / "keep.py"
    keep.write_text(brl.MARKER + "\n)\n" + harness)
    (tmp_path / "ab" / "no_harness.py").write_text(brl.MARKER + "\n)\n")
    (tmp_path / "pointwise.py").write_text("@triton_heuristics.pointwise(\n)\n" + harness)
    (tmp_path / "two.py").write_text(brl.MARKER + brl.MARKER + harness)  # a whole graph's output code
    assert brl.find_kernel_files(tmp_path) == [keep]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        brl.find_kernel_files(tmp_path / "missing")


def test_traffic_counts_each_storage_once() -> None:
    a = torch.zeros(10, 4, dtype=torch.bfloat16)  # 80 bytes
    b = torch.zeros(3, dtype=torch.float32)  # 12 bytes
    assert brl.traffic_bytes([a, b, a, 65536, 304]) == 92


def _head(rows: int, hint: int, reductions: int | None) -> str:
    meta = ("" if reductions is None
            else f"    inductor_meta={{'autotune_hints': set(), 'num_reduction': {reductions}}},\n")
    return (f"{brl.MARKER}\n    size_hints={{'x': {rows}, 'r0_': {hint}}},\n    reduction_hint=ReductionHint.INNER,\n"
            f"{meta})\n")


@pytest.mark.parametrize(("head", "own", "expected"), [
    (_head(65536, 512, 4), (2, 1), ("1x1", 4)),  # a backward norm kernel: one row per warp
    (_head(65536, 512, 2), (2, 1), ("2x1", 2)),  # a forward norm kernel: inductor's launch kept
    (_head(65536, 512, None), (2, 1), ("1x1", None)),  # no count in the source: changed, as in the trainer
    (_head(65536, 1024, 4), (1, 1), ("1x1", 4)),  # another width: its own launch
    (_head(65536, 512, 4), (1, 1), ("1x1", 4)),  # a cache compiled under the rule already: own is the rule's
    ("@triton_heuristics.pointwise(size_hints={'x': 8})\n", (4, 2), ("4x2", None)),
])
def test_rule_launch_is_the_products(head: str, own: tuple[int, int], expected: tuple[str, int | None]) -> None:
    assert brl.rule_launch(head, own) == expected


def test_sum_line_notes_a_nan_only_when_a_rule_launch_was_not_timed() -> None:
    rows = [{"own_us": 80.0, "best_us": 70.0, "rule_us": 75.0}, {"own_us": None, "best_us": 10.0, "rule_us": 12.5}]
    line = brl.sum_line(rows)
    assert "own 80.0 us, best 80.0 us, product's rule 87.5 us" in line and "nan" not in line
    rows[1]["rule_us"] = None
    assert brl.sum_line(rows).endswith("product's rule nan us (nan: a rule launch outside --grid)")
