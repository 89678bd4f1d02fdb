"""The bench's ``peer`` section on the CPU: the community packages' main models patched by patch_model against
unpatched (small sizes; under TRITON_INTERPRET=1 the fused op runs the Triton interpreter): the row schema, the
correctness columns, the fused calls per forward, speedups, FAIL rows with the reason for a missing package
(flash-perceiver, or a package that is not there), WRONG rows, the default selection and the CLI's --peer."""
import dataclasses
import importlib.util

import pytest
import torch

from helpers import count_fused_calls as profiler_fused_calls
from perceiver_fast.bench import peer as P
from perceiver_fast.bench.runner import BenchOptions, run
from perceiver_fast.bench.schema import ROW_FIELDS
from perceiver_fast.cli.common import UsageError

TOL = 1e-5


def installed(case: P.PeerCase) -> bool:
    try:
        return importlib.util.find_spec(case.module) is not None
    except ImportError:  # a parent package is missing
        return False


@pytest.fixture(scope="module")
def peer_rows():
    """One quick CPU run of every peer case (and nothing else). One intra-op thread: on a busy 2-core machine
    a second thread makes every small op wait for a descheduled worker."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run(BenchOptions(device="cpu", quick=True, ops=[], models=[], peer=P.peer_names(), progress=False),
                  log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert {r["section"] for r in res["rows"]} == {"peer"}
    return res["rows"]


@pytest.mark.parametrize("name", P.peer_names())
def test_peer_rows_on_cpu(peer_rows, name):
    case = P.peer_case(name)
    rows = [r for r in peer_rows if r["name"] == name and r["backend"] in (P.UNPATCHED, P.PATCHED)]
    assert [(r["backend"], r["direction"]) for r in rows] == [
        (P.UNPATCHED, "fwd"), (P.UNPATCHED, "fwd+bwd"), (P.PATCHED, "fwd"), (P.PATCHED, "fwd+bwd")]
    for r in rows:
        assert set(ROW_FIELDS) <= set(r) and r["section"] == "peer" and r["dtype"] == "float32"
        assert (r["package"], r["model"], r["patched"]) == (case.package, case.model, r["backend"] == P.PATCHED)
    if not installed(case):
        assert all(r["status"] == "FAIL" and case.package in r["reason"] and "pip install" in r["reason"]
                   for r in rows), rows
        pytest.skip(f"{case.package} is not installed: FAIL rows with the reason checked")
    unpatched = [r for r in rows if r["backend"] == P.UNPATCHED]
    patched = [r for r in rows if r["backend"] == P.PATCHED]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["fused_calls"] == 0 for r in unpatched), unpatched
    assert all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in unpatched)
    for r in patched:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["speedup_vs_eager"] == pytest.approx(unpatched[0 if r["direction"] == "fwd" else 1]["ms"] / r["ms"])
        assert r["fused_calls"] > 0, r
        assert f"{r['fused_calls']} fused calls/forward" in r["reason"]
        assert "CPU: fused op runs" in r["reason"], r["reason"]
        assert r["relerr"] is not None and r["relerr"] <= TOL, r
    bwd = [r for r in patched if r["direction"] == "fwd+bwd"][0]
    assert bwd["grad_relerr"] is not None and bwd["grad_relerr"] <= TOL, bwd


def test_flash_perceiver_row_says_why(peer_rows):
    rows = [r for r in peer_rows if r["backend"] == P.FLASH]
    assert [r["name"] for r in rows] == ["perceiver", "perceiver"]  # only perceiver-pytorch's Perceiver has it
    assert {r["direction"] for r in rows} == {"fwd", "fwd+bwd"}
    if importlib.util.find_spec("flash_perceiver") is None:
        assert all(r["status"] == "FAIL" and "flash-perceiver does not import" in r["reason"]
                   and "No module named 'flash_perceiver'" in r["reason"] for r in rows), rows
    else:  # imports, but this is a CPU
        assert all(r["status"] == "SKIP" and "n/a on this device" in r["reason"] for r in rows), rows
    assert all(r["ms"] is None and r["speedup_vs_eager"] is None for r in rows)


def test_peer_table_has_the_columns(peer_rows):
    table = P.format_peer_table(peer_rows)
    header = table.splitlines()[1]
    for col in ("package", "model", "impl", "dir", "ms", "x unpat", "fused", "relerr", "grad rel", "note"):
        assert col in header
    assert "patched:fused" in table and "unpatched:eager" in table and "flash-perceiver" in table
    assert P.format_peer_table([]) == ""


def test_missing_package_fails_with_the_reason(monkeypatch):
    gone = dataclasses.replace(P.peer_case("perceiver-io"), name="gone", package="no-such-perceiver",
                               module="no_such_perceiver_pkg", install="pip install no-such-perceiver")
    opts = BenchOptions(device="cpu", quick=True, ops=[], models=[], peer=["gone"]).resolved()
    rows = P.peer_case_rows(gone, opts)
    assert len(rows) == 4 and all(r["status"] == "FAIL" for r in rows)
    assert all("no-such-perceiver is not installed" in r["reason"] and "No module named 'no_such_perceiver_pkg'"
               in r["reason"] and "pip install no-such-perceiver" in r["reason"] for r in rows), rows


def test_a_patch_that_disagrees_is_wrong(monkeypatch):
    case = P.peer_case("perceiver-io")
    if not installed(case):
        pytest.skip("perceiver-pytorch is not installed")
    monkeypatch.setattr(P, "parity", lambda *a, **k: (2e-3, 3e-3))
    opts = BenchOptions(device="cpu", quick=True, ops=[], models=[], peer=["perceiver-io"], backward=False).resolved()
    rows = [r for r in P.peer_case_rows(case, opts) if r["backend"] == P.PATCHED]
    assert len(rows) == 1 and rows[0]["status"] == "WRONG" and rows[0]["relerr"] == 2e-3
    assert "relerr 2.00e-03 > 1e-05" in rows[0]["reason"]


def test_fused_call_count_matches_the_profiler():
    case = P.peer_case("perceiver")
    if not installed(case):
        pytest.skip("perceiver-pytorch is not installed")
    built, patched, n_modules = P.build_pair(case, True, "cpu", torch.float32)
    inputs = built.inputs("cpu", torch.float32)
    patched.eval()
    n = P.count_fused_calls(lambda: built.forward(patched, inputs))
    with torch.no_grad(), profiler_fused_calls() as calls:
        built.forward(patched, inputs)
    # small Perceiver: depth 1 = one cross-attention and self_per_cross_attn (2) self-attentions
    assert n == calls.attention_fwd == 3 == n_modules
    assert P.count_fused_calls(lambda: built.forward(built.model.eval(), inputs)) == 0


def test_default_selection():
    everything = P.peer_names()
    assert BenchOptions(device="cpu").resolved().peer == everything  # the full run
    assert BenchOptions(device="cpu", quick=True).resolved().peer == everything  # --quick
    assert BenchOptions(device="cpu", ops=["keras"]).resolved().peer == []  # a subset named: not unless asked
    assert BenchOptions(device="cpu", models=[]).resolved().peer == []
    assert BenchOptions(device="cpu", models=[], peer=["pio-arch"]).resolved().peer == ["pio-arch"]
    from perceiver_fast.bench.runner import build_jobs

    jobs = build_jobs(BenchOptions(device="cpu", ops=[], models=[], peer=["perceiver", "pio-arch"]).resolved())
    assert [j.label for j in jobs] == ["peer perceiver", "peer pio-arch"]


def test_cli_peer_flag_and_list(capsys):
    from perceiver_fast.cli.bench import list_shapes, peer_selection

    names = P.peer_names()
    assert peer_selection("auto", None, None, names) == names
    assert peer_selection("auto", ["keras"], None, names) == []
    assert peer_selection("all", ["keras"], [], names) == names
    assert peer_selection("none", None, None, names) == []
    assert peer_selection("pio-arch,perceiver", None, None, names) == ["pio-arch", "perceiver"]
    with pytest.raises(UsageError, match="unknown peer case 'nope'"):
        peer_selection("perceiver,nope", None, None, names)
    listing = list_shapes()
    for c in P.PEER_CASES:
        assert c.name in listing and c.package in listing
