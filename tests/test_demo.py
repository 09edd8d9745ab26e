"""The main job: `nlmegen demo` fits, prints and writes its figures, and never overwrites silently."""

import pytest

from nlmegen.__main__ import FIGURES, main


def test_demo_writes_figures_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-sim", "50"]) == 0
    printed = capsys.readouterr().out
    assert "OFV 116.80" in printed and "converged" in printed
    for name in FIGURES:
        assert (out / name).stat().st_size > 20_000, name
    before = (out / FIGURES[0]).stat().st_mtime_ns
    with pytest.raises(SystemExit, match="--force"):
        main(["demo", "--out", str(out)])
    assert (out / FIGURES[0]).stat().st_mtime_ns == before
