"""bench/vs_llamacpp.py without llama.cpp: its build options, request bodies and report maths.

The benchmark itself (a llama.cpp build, three servers, minutes of decoding) is not in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.vs_llamacpp import (
    ADAPTERS,
    CLIENTS,
    SYSTEMS,
    Case,
    Figures,
    Measured,
    Request,
    Timing,
    agreement,
    cmake_options,
    dynamerge_body,
    llama_body,
    parse_args,
    ratio_table,
    ratios,
    report,
    table,
)

AVX512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}


def test_cmake_options_never_native_nor_amx_and_follow_the_cpu_flags() -> None:
    flags = {"avx", "avx2", "fma", "f16c", "amx_tile", "amx_int8", "amx_bf16", *AVX512}
    options = cmake_options(flags)
    assert "-DGGML_NATIVE=OFF" in options
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(options)
    assert not any(o.startswith("-DGGML_AMX") and o.endswith("=ON") for o in options)
    assert {"-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=OFF"} <= set(options)
    # GGML_AVX512 passes -mavx512cd/vl/dq/bw too: all of them must be there.
    assert "-DGGML_AVX512=OFF" in cmake_options(flags - {"avx512bw"})


def test_request_bodies_name_the_same_blend() -> None:
    blend = Request("What is 2 plus 2?", (1, 2, 3), (("spell", 0.8), ("arithmetic", 0.2)))
    llama = llama_body(blend, 32)
    assert {(x["id"], x["scale"]) for x in llama["lora"]} == {
        (ADAPTERS.index("spell"), 0.8), (ADAPTERS.index("arithmetic"), 0.2),
        (ADAPTERS.index("unit_convert"), 0.0)}
    assert llama["prompt"] == [1, 2, 3]
    assert (llama["cache_prompt"], llama["ignore_eos"], llama["temperature"]) == (False, True, 0)
    ours = dynamerge_body(blend, 32)
    assert ours["model"] == "auto"
    assert ours["routing"]["adapters"] == ["spell", "arithmetic"]
    assert (ours["routing"]["top_k"], ours["routing"]["min_weight"]) == (2, 0)
    assert dynamerge_body(Request("x", (1,), (("spell", 1.0),)), 32)["model"] == "spell"
    base = Request("x", (1,))
    assert dynamerge_body(base, 32)["model"] == "base"
    # Base names every adapter at scale 0: an empty list would keep the slot's last LoRA.
    assert [x["scale"] for x in llama_body(base, 32)["lora"]] == [0.0] * len(ADAPTERS)


def _figures() -> dict:
    dm, t1, t2 = SYSTEMS
    f = {}
    for case in ("base", "one adapter", "blend of two"):
        f[(case, 1, dm)] = Figures(tok_s=17.0, tpot_ms=55.0, ttft_ms=100)
        f[(case, 1, t1)] = Figures(tok_s=21.0, tpot_ms=44.0, ttft_ms=50)
        f[(case, 1, t2)] = Figures(tok_s=40.0, tpot_ms=22.0, ttft_ms=30)
    f[("base", CLIENTS, dm)] = Figures(50.0, 150.0, 300)
    f[("base", CLIENTS, t2)] = Figures(100.0, 70.0, 200)
    f[("blend of two each, different weights", CLIENTS, dm)] = Figures(48.0, 160.0, 900)
    f[("blend of two each, different weights", CLIENTS, t2)] = Figures(20.0, 40.0, 4000)
    return f


def test_ratios_follow_the_issue_targets() -> None:
    rows = {what: (value, target, met) for what, value, target, met in ratios(_figures())}
    value, target, met = rows["TPOT @1, one thread each: base, dynamerge / llama.cpp t1"]
    assert (value, target, met) == (pytest.approx(55 / 44), "<= 1.1", False)
    assert rows["TPOT @1, defaults: blend of two, dynamerge / llama.cpp t2"][0] == 2.5
    assert rows[f"tok/s @{CLIENTS}: different blends, dynamerge / llama.cpp t2"][1:] == \
        (">= 2", True)
    assert rows[f"tok/s @{CLIENTS}: base, dynamerge / llama.cpp t2"][1:] == (">= 0.8", False)
    assert rows["tok/s @1: dynamerge blend / base"][0] == 1.0
    # A ratio whose figures are missing (no adapter case at 8 clients here) is left out.
    assert not any("different adapters" in what for what in rows)
    assert "| missed |" in ratio_table(ratios(_figures()))
    # dynamerge on every core: no "one thread each" rows
    assert not any("one thread each" in r[0] for r in ratios(_figures(), None))


def test_table_has_a_row_per_case_and_dashes_for_missing_figures() -> None:
    text = table([("base", 1), ("base", CLIENTS)], _figures())
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| base | 1 | 17.0 (55.0) | 21.0 (44.0) | 40.0 (22.0) |")
    assert "| 50.0 (150.0) | - | 100.0 (70.0) |" in lines[3]


def test_agreement_lists_every_mismatch() -> None:
    spell, base = Request("Spell cat", (1,), (("spell", 1.0),)), Request("Hi", (2,))
    answers = {spell: dict.fromkeys(SYSTEMS, "c-a-t"),
               base: {SYSTEMS[0]: "Hello", SYSTEMS[1]: "Hey", SYSTEMS[2]: "Hey"}}
    same, lines = agreement(answers)
    assert same == 1
    assert lines == ["- base | 'Hi':", f"    {SYSTEMS[0]}: 'Hello'", f"    {SYSTEMS[1]}: 'Hey'",
                     f"    {SYSTEMS[2]}: 'Hey'"]
    assert llama_body(spell, 32, ignore_eos=False)["ignore_eos"] is False
    assert dynamerge_body(spell, 32, ignore_eos=False)["ignore_eos"] is False


def test_args() -> None:
    assert parse_args([]).rounds == 3
    assert parse_args(["--quick"]).rounds == 1
    assert parse_args(["--quick", "--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        parse_args(["--max-tokens", "1"])
    assert parse_args(["--dynamerge-env", "DYNAMERGE_TORCH_THREADS=2"]).dynamerge_env == \
        ["DYNAMERGE_TORCH_THREADS=2"]
    with pytest.raises(SystemExit):
        parse_args(["--dynamerge-env", "DYNAMERGE_TORCH_THREADS"])


def test_report_prints_the_tables_and_writes_the_figures(tmp_path: Path, capsys) -> None:
    """The end of a long run, with made-up timings: 10 tokens, 100 ms apart, after 50 ms."""
    spell = Request("Spell cat", (1, 2), (("spell", 0.7), ("arithmetic", 0.3)))
    cases = [Case("blend of two", 1, ((spell,),))]
    timing = Timing(sent=0.0, first=0.05, done=0.95, tokens=10, prompt_tokens=2, text="c-a-t")
    results = {("blend of two", 1, s): Measured([(spell, timing)], wall_s=1.0) for s in SYSTEMS}
    args = parse_args(["--quick", "--json", str(tmp_path / "out.json"),
                       "--dynamerge-env", "DYNAMERGE_DECODE_THREADS=1"])
    report(args, cases, results, {spell: dict.fromkeys(SYSTEMS, "c-a-t")},
           {spell.prompt: {(s, 2) for s in SYSTEMS}})
    out = capsys.readouterr().out
    assert "| blend of two | 1 | 10.0 (100.0) | 10.0 (100.0) | 10.0 (100.0) | 50 / 50 / 50 |" \
        in out
    assert "| TPOT @1, one thread each: blend of two, dynamerge / llama.cpp t1 | 1.000 |" in out
    assert "spell:0.7+arithmetic:0.3" in out
    assert "prompt tokens equal on every server: yes" in out
    assert "identical on every server: 1/1" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["figures"][0]["tok_s"] == 10.0
    assert saved["answers"][0][SYSTEMS[1]] == "c-a-t"
