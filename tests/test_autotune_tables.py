"""benchmarks/autotune_tables.py: reading inductor's AUTOTUNE tables from a compile log."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import autotune_tables as at  # noqa: E402

LOG = """\
W1129 some warning
Autotune Choices Stats:
{"num_choices": 21, "num_triton_choices": 20, "best_kernel": "mm", "best_time": 0.43}
AUTOTUNE mm(65536x304, 304x6144)
strides: [304, 1], [1, 304]
dtypes: torch.bfloat16, torch.bfloat16
  mm 0.4340 ms 100.0%
  triton_mm_176 0.6060 ms 71.6% ACC_TYPE='tl.float32', BLOCK_K=32, num_stages=3, num_warps=4
SingleProcess AUTOTUNE benchmarking takes 10.5 seconds
Autotune Choices Stats:
{"num_choices": 22, "num_triton_choices": 20, "best_kernel": "triton_mm_217"}
AUTOTUNE addmm(65536x304, 65536x304, 304x304)
strides: [0, 1], [304, 1], [1, 304]
dtypes: torch.bfloat16, torch.bfloat16, torch.bfloat16
  triton_mm_217 0.0539 ms 100.0% ACC_TYPE='tl.float32', BLOCK_K=64
  triton_mm_214 0.0583 ms 92.4% ACC_TYPE='tl.float32', BLOCK_K=32
E1129 an error line
AUTOTUNE mm(304x65536, 65536x56)
strides: [1, 304], [56, 1]
dtypes: torch.bfloat16, torch.bfloat16
  decompose_k_mm_128_split_84 0.0270 ms 100.0% k_split=128
  mm 0.0280 ms 96.4%
"""


def test_parse_and_summarise_each_table() -> None:
    tables = at.parse_log(LOG)
    assert [t["gemm"] for t in tables] == ["mm(65536x304, 304x6144)", "addmm(65536x304, 65536x304, 304x304)",
                                           "mm(304x65536, 65536x56)"]
    assert [t["num_choices"] for t in tables] == [21, 22, None]  # the stats line precedes its own table only
    assert tables[1]["choices"] == [("triton_mm_217", 0.0539), ("triton_mm_214", 0.0583)]  # stops at the E line
    first, second, third = (at.summarise(t) for t in tables)
    assert (first["cublas_ms"], first["template_ms"], first["winner"]) == (0.434, 0.606, "mm")
    # no cuBLAS choice among those shown: cuBLAS is slower than the slowest shown
    assert second["cublas_ms"] is None and second["cublas_above_ms"] == 0.0583 and second["template_ms"] == 0.0539
    assert (third["cublas_ms"], third["template_ms"], third["winner"]) == (0.028, 0.027, "decompose_k_mm_128_split_84")


def test_script_reads_a_gz_log_and_rejects_one_without_tables(tmp_path: Path) -> None:
    log = tmp_path / "a.log.gz"
    log.write_bytes(gzip.compress(LOG.encode()))
    out = subprocess.run([sys.executable, str(BENCH / "autotune_tables.py"), str(log)], capture_output=True,
                         text=True, check=True).stdout
    assert "addmm(65536x304, 65536x304, 304x304)" in out and ">0.0583" in out
    empty = tmp_path / "b.log"
    empty.write_text("nothing here\n")
    proc = subprocess.run([sys.executable, str(BENCH / "autotune_tables.py"), str(empty)], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "b.log: no 'AUTOTUNE ...' tables" in proc.stderr


@pytest.mark.parametrize("name", ["missing.log", "bad.gz"])
def test_script_names_an_unreadable_log(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "bad.gz":
        path.write_bytes(b"not gzip")
    proc = subprocess.run([sys.executable, str(BENCH / "autotune_tables.py"), str(path)], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and f"{name}: cannot read" in proc.stderr
