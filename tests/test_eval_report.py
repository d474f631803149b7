"""Self-contained HTML evaluation report (diffalign.eval.report)."""

from __future__ import annotations

import base64
import io

import html5lib
import pytest
from PIL import Image

from diffalign.eval.report import _metric_names, score_distribution_figure, training_curves_figure, write_report

ODD_LABEL = 'run<1>&"x"'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results() -> dict:
    base = {"pickscore": {"mean": 20.1, "ci": [19.9, 20.3], "n": 8}, "aesthetic": {"mean": 5.2, "ci": [5.0, 5.4]}}
    tuned = {"pickscore": {"mean": 20.4, "ci": [20.2, 20.6], "n": 8}, "aesthetic": {"mean": 5.1, "ci": [4.9, 5.3]}}
    return {
        "settings": {"num_prompts": 4},
        "models": {"base": base, ODD_LABEL: tuned},
        "comparisons": [
            {
                "checkpoint": ODD_LABEL,
                "reward": "pickscore",
                "n": 8,
                "win_rate": 0.61,
                "win_rate_ci": [0.52, 0.70],
                "wins": 5,
                "losses": 3,
                "ties": 0,
                "mean": 20.4,
                "mean_ci": [20.2, 20.6],
                "base_mean": 20.1,
                "base_mean_ci": [19.9, 20.3],
            },
            {
                "checkpoint": ODD_LABEL,
                "reward": "aesthetic",
                "n": 8,
                "win_rate": 0.45,
                "win_rate_ci": [0.30, 0.60],
                "wins": 3,
                "losses": 4,
                "ties": 1,
                "mean": 5.1,
                "mean_ci": [4.9, 5.3],
                "base_mean": 5.2,
                "base_mean_ci": [5.0, 5.4],
            },
            {"checkpoint": "other", "reward": "pickscore", "n": 8, "win_rate": 0.3, "win_rate_ci": [0.2, 0.4]},
        ],
    }


def _scores() -> dict[str, dict[str, list[float]]]:
    return {
        "pickscore": {"base": [20.0, 20.5, 19.8, 20.1], ODD_LABEL: [20.6, 20.2, 20.4, 20.3]},
        "aesthetic": {"base": [5.0, 5.5, 5.2, 5.1], ODD_LABEL: [5.1, 5.0, 5.3, 5.2]},
    }


def _curves() -> dict[str, list[dict]]:
    def rows(offset: float) -> list[dict]:
        return [
            {
                "step": s,
                "lr": 1e-5,
                "loss": 0.7 - 0.01 * s + offset,
                "implicit_accuracy": 0.5 + s / 100,
                "steps_per_s": 2,
            }
            for s in range(0, 30, 5)
        ]

    return {ODD_LABEL: rows(0.0), "dpo/seed1": rows(0.05)}


@pytest.fixture
def grid_png(tmp_path):
    path = tmp_path / "grid_0.png"
    Image.new("RGB", (96, 64), (30, 120, 200)).save(path)
    return path


def _write(tmp_path, grids, curves=None) -> str:
    out = write_report(
        tmp_path / "out" / "report.html",
        title=f"Eval of {ODD_LABEL}",
        settings={"prompts": "parti <subset>", "seeds": [0, 1], "guidance_scale": 7.5},
        results=_results(),
        grids=grids,
        scores=_scores(),
        curves=_curves() if curves is None else curves,
    )
    assert out == tmp_path / "out" / "report.html"
    return out.read_text(encoding="utf-8")


def _images(text: str) -> list:
    tree = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)
    return tree.findall(".//img")


def _decode_image(src: str) -> Image.Image:
    head, payload = src.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.verify()
    return image


def test_report_is_valid_self_contained_html(tmp_path, grid_png):
    second = tmp_path / "grid_1.png"
    Image.new("RGB", (50, 50), (200, 20, 20)).save(second)
    text = _write(tmp_path, [grid_png, second])
    assert text.startswith("<!DOCTYPE html>")
    images = _images(text)  # strict parsing raises on any parse error
    assert len(images) == 2 + 2  # two grids, the score distributions and the training curves
    for img in images:
        _decode_image(img.get("src"))
    assert "http://" not in text and "https://" not in text
    scripts = html5lib.HTMLParser(namespaceHTMLElements=False).parse(text).findall(".//script")
    assert len(scripts) == 1 and scripts[0].get("src") is None          # one inline script: the prompt pager
    assert not list(tmp_path.joinpath("out").glob(".tmp-*"))  # the temporary file was renamed away


def test_user_strings_are_escaped(tmp_path, grid_png):
    text = _write(tmp_path, [grid_png])
    assert ODD_LABEL not in text
    assert "run&lt;1&gt;&amp;&quot;x&quot;" in text
    assert "parti &lt;subset&gt;" in text and "<subset>" not in text
    tree = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)
    assert tree.find(".//title").text == f"Eval of {ODD_LABEL}"


def test_comparison_table_rows(tmp_path, grid_png):
    text = _write(tmp_path, [grid_png])
    assert '<td class="better">0.610 [0.520, 0.700]</td>' in text
    assert "<td>0.450 [0.300, 0.600]</td>" in text  # interval straddles 0.5: not marked
    assert "20.1 [19.9, 20.3]" in text and "20.4 [20.2, 20.6]" in text   # means: 5 significant digits
    assert "5 / 3 / 0" in text and "3 / 4 / 1" in text
    assert '<td class="worse">0.300 [0.200, 0.400]</td>' in text
    assert "<td>n/a</td><td>n/a</td><td>n/a</td></tr>" in text  # the "other" row has no means or counts


def test_without_curves_the_figure_is_replaced_by_a_sentence(tmp_path, grid_png):
    text = _write(tmp_path, [grid_png], curves={})
    assert "No training logs were found." in text
    assert len(_images(text)) == 1 + 1  # the grid and the score distributions


def test_large_grid_is_embedded_as_jpeg(tmp_path, monkeypatch):
    import diffalign.eval.report as report

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(path)
    monkeypatch.setattr(report, "MAX_PNG_EMBED_BYTES", 10)
    text = _write(tmp_path, [path], curves={})
    sources = [img.get("src") for img in _images(text)]
    assert sum(src.startswith("data:image/jpeg;base64,") for src in sources) == 1
    assert _decode_image(sources[-1]).format == "JPEG"


def test_score_distribution_figure():
    png = score_distribution_figure(_scores())
    assert png is not None and png.startswith(PNG_MAGIC)
    Image.open(io.BytesIO(png)).verify()
    constant = score_distribution_figure({"clip": {"base": [0.3, 0.3], "tuned": []}})
    assert constant is not None and constant.startswith(PNG_MAGIC)
    dollars = score_distribution_figure({"a$b$c": {"$x^{$": [1.0, 2.0]}})  # never parsed as mathtext
    assert dollars is not None and dollars.startswith(PNG_MAGIC)
    assert score_distribution_figure({}) is None


def test_training_curves_figure():
    png = training_curves_figure(_curves())
    assert png is not None and png.startswith(PNG_MAGIC)
    Image.open(io.BytesIO(png)).verify()
    assert training_curves_figure({}) is None
    assert _metric_names(_curves()) == ["loss", "implicit_accuracy", "lr"]  # no step/steps_per_s, lr last
    assert _metric_names({"a": [{"step": 1, "loss": 0.5}], "b": [{"step": 1, "grad_norm": 2.0, "note": "x"}]}) == [
        "loss",
        "grad_norm",
    ]
    assert training_curves_figure({"run": []}) is None


def test_per_prompt_view_puts_every_models_image_of_a_prompt_side_by_side(tmp_path):
    from diffalign.eval.report import smoothed

    records, scores = [], {"brightness": []}
    for prompt_index, prompt in enumerate(["a <red> circle", "a blue square"]):
        for seed in (0, 1):
            for model, shade in (("base", 40), ("dpo", 200)):
                path = tmp_path / f"{model}_{prompt_index}_{seed}.png"
                Image.new("RGB", (64, 32), (shade, shade, shade)).save(path)
                records.append({"checkpoint": model, "prompt": prompt, "prompt_index": prompt_index, "seed": seed,
                                "path": str(path)})
                scores["brightness"].append(shade / 255)
    out = write_report(tmp_path / "out" / "report.html", title="t", settings={}, results={"models": {}},
                       grids=[], scores={}, curves={}, records=records, record_scores=scores)
    tree = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(out.read_text(encoding="utf-8"))
    views = tree.findall(".//section")
    assert [v.get("data-prompt") for v in views] == ["0", "1"]
    assert views[0].find("h3").text == "0: a <red> circle"                     # escaped, then parsed back
    heads = [th.text for th in views[0].find(".//tr").findall("th")]
    assert heads == [None, "base", "dpo"]
    cells = views[1].findall(".//td")
    assert len(cells) == 4 and [c.find("div").text for c in cells[:2]] == ["brightness 0.15686", "brightness 0.78431"]
    thumb = _decode_image(cells[1].find("img").get("src"))
    assert thumb.size == (64, 32)             # thumbnails shrink to THUMB px at most, never enlarge
    assert len(tree.findall(".//option")) == 2
    no_view = write_report(tmp_path / "o2" / "report.html", title="t", settings={}, results={"models": {}},
                           grids=[], scores={}, curves={})
    assert "<h2>Per prompt</h2>" not in no_view.read_text(encoding="utf-8")
    assert smoothed([1.0, 3.0]) == [1.0, 3.0]                                   # too few points: raw
    ema = smoothed([0.0, 10.0], weight=0.5)     # debiased: 0, then (0.5*0 + 0.5*10) / (1 - 0.25) = 6.667
    assert ema[0] == 0.0 and abs(ema[1] - 20 / 3) < 1e-12
