"""`rlhf-launch plot`: a PNG of the reward and KL curves (or the metrics chosen), clean errors for unplottable folders."""

from __future__ import annotations

import json

import pytest

from rlhf_launch.frontend.plot import PlotError, main, moving_average, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, n, torn=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "reward_mean": 0.1 * s, "kl": None if s == 2 else 0.01 * s}) for s in range(1, n + 1)]
    text = "\n".join(lines) + "\n" + ('{"step": 99, "rew' if torn else "")
    (run_dir / "metrics.jsonl").write_text(text)


@pytest.mark.parametrize("n", [3, 25])  # without and with a moving average
def test_plot_writes_a_png_into_the_run_folder(tmp_path, n):
    write_metrics(tmp_path, n, torn=True)
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_with_only_one_curve_logged(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    assert plot_run(tmp_path, tmp_path / "sub" / "r.png").read_bytes().startswith(PNG_MAGIC)


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no such run folder"),
        (lambda d: d.mkdir(), "no metrics.jsonl"),
        (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "no reward_mean or kl values"),
        (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n')), "no reward_mean or kl values"),
        (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step\n{"step": 2}\n')), "damaged"),
    ],
)
def test_unplottable_run_folders_raise_plot_error(tmp_path, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    with pytest.raises(PlotError, match=message):
        plot_run(run_dir)
    assert not (tmp_path / "run" / "curves.png").exists()


def test_main_prints_the_written_path(tmp_path, capsys):
    write_metrics(tmp_path, 12)
    out = tmp_path / "plots" / "x.png"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_main_reports_an_empty_folder_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("rlhf-launch plot: ") and "no metrics.jsonl" in captured.err


def test_metrics_option_plots_the_chosen_keys_and_names_the_logged_ones(tmp_path, capsys):
    from rlhf_launch.frontend.plot import load_curves

    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward_mean": 0.1 * s, "filtered_frac": 0.5, "entropy": None}) + "\n" for s in (1, 2, 3))
    )
    assert main([str(tmp_path), "--metrics", "reward_mean, filtered_frac,reward_mean"]) == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert load_curves(tmp_path, ("filtered_frac", "kl")) == {"filtered_frac": ([1, 2, 3], [0.5] * 3), "kl": ([], [])}
    capsys.readouterr()
    assert main([str(tmp_path), "--metrics", "kl,entropy"]) == 2  # neither logged (entropy only as null)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no kl or entropy values" in err and "it logs: filtered_frac, reward_mean" in err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--metrics", " , "])


def test_default_panels_put_the_response_length_in_place_of_a_kl_the_run_never_logged(tmp_path):
    from rlhf_launch.frontend.plot import load_curves

    def logged(**values):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **values}) + "\n" for s in (1, 2)))
        return list(load_curves(tmp_path))

    assert logged(reward_mean=0.5, response_len_mean=30.0) == ["reward_mean", "response_len_mean"]  # no reference
    assert logged(reward_mean=0.5, response_len_mean=30.0, kl=0.1) == ["reward_mean", "kl"]
    assert logged(reward_mean=0.5, response_len_mean=30.0, kl=None) == ["reward_mean", "response_len_mean"]
    assert logged(reward_mean=0.5) == ["reward_mean", "kl"]  # nothing to put in kl's place: its panel says so
