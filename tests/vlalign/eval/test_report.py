"""Benchmark report files and CLIP_benchmark records."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
import torch.nn.functional as F

from vlalign.eval import (
    clip_benchmark_record,
    expected_calibration_error,
    per_class_accuracy,
    recall_curve,
    retrieval_chance,
    retrieval_metrics,
    write_benchmark_report,
    zero_shot_chance,
    zero_shot_metrics,
)


@pytest.fixture(scope="module")
def results():
    """A report input built with the real metric functions on small random data."""
    gen = torch.Generator().manual_seed(0)
    n_images, max_k = 20, 10
    image_emb = F.normalize(torch.randn(n_images, 8, generator=gen), dim=-1)
    mapping = torch.arange(n_images).repeat_interleave(3)
    text_emb = F.normalize(image_emb[mapping] + 0.7 * torch.randn(len(mapping), 8, generator=gen), dim=-1)
    retrieval = retrieval_metrics(image_emb, text_emb, mapping)
    retrieval["chance"] = retrieval_chance(mapping, n_images, ks=range(1, max_k + 1)) | retrieval_chance(mapping, n_images)
    retrieval["curve"] = recall_curve(image_emb, text_emb, mapping, max_k=max_k)
    retrieval["description"] = "Flickr demo test split, English, 3 captions per image."

    classes = ["red circle", "green square", "blue triangle", "yellow star", "purple heart", "white cross"]
    labels = torch.randint(0, len(classes), (60,), generator=gen)
    logits = torch.randn(60, len(classes), generator=gen) + 2 * F.one_hot(labels, len(classes))
    zero_shot = zero_shot_metrics(logits, labels)
    zero_shot["chance"] = zero_shot_chance(labels, len(classes))
    zero_shot["per_class_accuracy"] = dict(zip(classes, per_class_accuracy(logits, labels).tolist()))
    zero_shot["reliability"] = expected_calibration_error(torch.softmax(logits, dim=1), labels)
    return {"retrieval": retrieval, "zero_shot": zero_shot}


def test_report_files_contain_metrics_chance_and_plots(results, tmp_path):
    paths = write_benchmark_report(results, tmp_path / "report", title="Demo benchmark")
    assert set(paths) == {
        "markdown", "html", "retrieval:recall_curve", "zero_shot:reliability", "zero_shot:per_class_accuracy",
    }
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    md = paths["markdown"].read_text()
    assert md.startswith("# Demo benchmark")
    assert "Flickr demo test split" in md
    r1 = results["retrieval"]["image_retrieval_recall@1"]
    r1_chance = results["retrieval"]["chance"]["image_retrieval_recall@1"]
    assert f"| image_retrieval_recall@1 | {r1:.4f} | {r1_chance:.4f} |" in md
    assert f"| rsum | {results['retrieval']['rsum']:.2f} | " in md
    zs = results["zero_shot"]
    assert f"| acc1 | {zs['acc1']:.4f} | {1 / 6:.4f} |" in md
    assert f"| mean_per_class_recall | {zs['mean_per_class_recall']:.4f} | " in md
    assert f"| ece | {zs['reliability']['ece']:.4f} | - |" in md
    # Markdown references each plot by a relative path that resolves next to it.
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(referenced) == 3
    for rel in referenced:
        assert not rel.startswith("/") and (paths["markdown"].parent / rel).is_file()


def test_html_is_self_contained(results, tmp_path):
    paths = write_benchmark_report(results, tmp_path, title="A <b>title</b>")
    page = paths["html"].read_text()
    assert "<title>A &lt;b&gt;title&lt;/b&gt;</title>" in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 3 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"<td>acc5</td><td>{results['zero_shot']['acc5']:.4f}</td>" in page


def test_sections_without_plots_and_unusual_names(tmp_path):
    paths = write_benchmark_report(
        {"flickr_zh / retrieval": {"split": "test", "image_retrieval_recall@1": 0.25}}, tmp_path, title="t"
    )
    assert set(paths) == {"markdown", "html"}
    md = paths["markdown"].read_text()
    assert "## flickr_zh / retrieval" in md and "*split: test*" in md
    assert "| image_retrieval_recall@1 | 0.2500 | - |" in md


def test_nested_metrics_shape_with_details(tmp_path):
    # The shape vlalign.eval.run returns: metrics nested, details beside them.
    section = {
        "split": "test",
        "language": "zh",
        "n_images": 40,
        "metrics": {"image_retrieval_recall@1": 0.125, "rsum": 321.5},
        "chance": {"image_retrieval_recall@1": 0.025},
    }
    paths = write_benchmark_report({"flickr_zh": section}, tmp_path, title="t")
    md = paths["markdown"].read_text()
    assert "*split: test; language: zh; n_images: 40*" in md
    assert "| image_retrieval_recall@1 | 0.1250 | 0.0250 |" in md
    assert "| rsum | 321.50 | - |" in md
    assert "| n_images |" not in md
    assert "<em>split: test; language: zh; n_images: 40</em>" in paths["html"].read_text()


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({}, "non-empty mapping"),
        ({"retrieval": {"acc1": [0.5]}}, r"results\['retrieval'\]\['acc1'\] is list"),
        ({"retrieval": {"metrics": {"acc1": "high"}}}, r"\['metrics'\] must map metric names to numbers"),
        ({"r": {"curve": {"k": [1, 2], "image_retrieval_recall": [0.1]}}}, "equally long"),
        ({"z": {"reliability": {"bins": []}}}, "expected_calibration_error"),
    ],
)
def test_bad_results_raise_clear_errors(results, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        write_benchmark_report(results, tmp_path, title="t")


def test_clip_benchmark_record_shape():
    record = clip_benchmark_record(
        "flickr30k", "vlalign-demo", "zeroshot_retrieval", {"image_retrieval_recall@5": 0.5}, "en",
        pretrained="stage2.pt",
    )
    assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert record["metrics"] == {"image_retrieval_recall@5": 0.5}
    json.dumps(record)
    without = clip_benchmark_record("imagenet1k", "m", "zeroshot_classification", {"acc1": 1}, "zh")
    assert list(without) == ["dataset", "model", "task", "metrics", "language"]
    assert isinstance(without["metrics"]["acc1"], float)


def test_clip_benchmark_record_rejects_bad_task_and_values():
    with pytest.raises(ValueError, match="not a CLIP_benchmark task"):
        clip_benchmark_record("d", "m", "retrieval", {}, "en")
    with pytest.raises(ValueError, match=r"metrics\['chance'\] is dict"):
        clip_benchmark_record("d", "m", "zeroshot_classification", {"acc1": 0.1, "chance": {}}, "en")
