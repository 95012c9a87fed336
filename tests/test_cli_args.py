"""Arguments of the ``dynsparse`` subcommands: help texts and values refused by argparse (exit 2, no traceback)."""

from __future__ import annotations

import pytest

from dynsparse.cli import main


@pytest.mark.parametrize("command", ["train r.yaml", "demo", "sensitivity r.yaml"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_threads_must_be_a_positive_integer(command, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--threads", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads:" in err and "Traceback" not in err


def test_every_eval_option_has_a_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ["digits, mnist, fashion-mnist or image-folder", "required for image-folder", "data.image_size"]:
        assert text in out


def test_sensitivity_device_help_does_not_promise_a_latency_report(capsys):
    with pytest.raises(SystemExit):
        main(["sensitivity", "--help"])
    assert "latency" not in capsys.readouterr().out
