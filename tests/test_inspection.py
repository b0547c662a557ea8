"""``raywaste inspect`` on the full official annotations, on the sample with photos, and on a broken file."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raywaste.cli import main
from raywaste.inspection import box_size_buckets, format_summary, inspect_annotations
from raywaste.plots import Box, Tile, plot_counts, plot_image_grid


@pytest.fixture(scope="module")
def official(taco_official):
    return inspect_annotations(taco_official)


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_official_counts(official):
    _, summary = official
    assert summary.images == 1500
    assert summary.annotations == 4784
    assert len(summary.categories) == 60
    assert len(summary.supercategories) == 28
    assert summary.annotations_per_image["min"] == 1
    assert summary.annotations_per_image["max"] == 90
    assert sum(summary.annotations_per_image_buckets.values()) == 1500
    assert summary.annotations_per_image_buckets["0"] == 0


def test_official_tables_sorted(official):
    _, summary = official
    counts = [row["annotations"] for row in summary.categories]
    assert counts == sorted(counts, reverse=True)
    assert summary.categories[0] == {"name": "Cigarette", "supercategory": "Cigarette", "annotations": 667, "images": 227}
    assert sum(counts) == 4784
    assert summary.supercategories[0]["name"] == "Plastic bag & wrapper"
    assert summary.supercategories[0]["annotations"] == 850
    assert summary.supercategories[0]["categories"] == 7
    bottle = next(row for row in summary.supercategories if row["name"] == "Bottle")
    assert bottle["images"] == 322


def test_official_box_sizes(official):
    _, summary = official
    assert summary.box_sizes["under 32x32"] == 383
    assert sum(summary.box_sizes.values()) == 4784
    assert summary.box_shorter_side_px["min"] == 4.0


def test_official_scene_tags(official):
    _, summary = official
    tags = {row["name"]: row["images"] for row in summary.scene_tags}
    assert tags["Vegetation"] == 940
    assert tags["unknown (id 7)"] == 26
    assert summary.images_without_scene_tags == 4
    assert summary.findings.unknown_scene_tags == {7: 26}


def test_official_findings(official):
    _, summary = official
    findings = summary.findings
    assert findings.errors == []
    assert findings.repeated_annotation_ids == {309: [93, 101], 4040: [1281, 1300]}
    assert len(findings.clipped_boxes) == 7
    assert findings.oversized_boxes == []
    assert findings.unusual_category_names == ["Food Can"]
    assert findings.unused_categories == ["Plastified paper bag"]
    text = format_summary(summary)
    assert "annotation id 309 occurs on 2 images (image ids 93, 101)" in text
    assert "annotation id 4040 occurs on 2 images (image ids 1281, 1300)" in text
    assert "'Food Can'" in text


def test_box_size_bucket_edges():
    boxes = [(0, 0, 31, 33), (0, 0, 32, 32), (0, 0, 95, 96), (0, 0, 600, 600)]
    assert box_size_buckets(boxes) == {
        "under 32x32": 1,
        "32x32 to 96x96": 2,
        "96x96 to 256x256": 0,
        "256x256 to 512x512": 0,
        "512x512 and over": 1,
    }


def test_cli_official_plots(taco_official, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(taco_official), "--plots", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1500 images, 4784 annotations" in result.output
    assert "no photos found" in result.output
    assert png_size(tmp_path / "categories.png") == (900, 110 + 22 * 60)
    assert png_size(tmp_path / "supercategories.png") == (900, 110 + 22 * 28)
    assert png_size(tmp_path / "scene_tags.png") == (900, 110 + 22 * 8)
    assert png_size(tmp_path / "annotations_per_image.png") == (800, 450)
    assert png_size(tmp_path / "box_sizes.png") == (800, 450)
    assert not (tmp_path / "samples.png").exists()


def test_cli_sample_photo_grid(taco_sample, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(taco_sample / "annotations.json"), "--plots", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "photos: 102 of 102 found" in result.output
    # 9 photos in 3 columns of 320-pixel tiles with two caption lines.
    assert png_size(tmp_path / "samples.png") == (984, 36 + 3 * (320 + 2 * 13 + 8))
    grid = np.asarray(Image.open(tmp_path / "samples.png").convert("RGB"))
    assert grid.std() > 20


def test_cli_images_option_finds_photos(taco_official, taco_sample, tmp_path):
    arguments = ["inspect", str(taco_official), "--images", str(taco_sample), "--plots", str(tmp_path), "--samples", "4"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert "photos: 102 of 1500 found" in result.output
    assert png_size(tmp_path / "samples.png") == (984, 36 + 2 * (320 + 2 * 13 + 8))


def test_cli_broken_file_lists_all(tmp_path):
    document = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 1, "file_name": "b.jpg", "width": 100, "height": 80},
        ],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 0, "bbox": [-1, 0, 10, 10]},
            {"id": 6, "image_id": 1, "category_id": 9, "bbox": [0, 0, 10, 10]},
            {"id": 7, "image_id": 3, "category_id": 0, "bbox": [0, 0, 10, 10]},
        ],
        "categories": [{"id": 0, "name": "Drink can", "supercategory": "Can"}],
    }
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(document))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "3 error(s) that stop preprocessing" in result.output
    assert "image id 1 occurs twice" in result.output
    assert "annotation id 6 refers to category id 9" in result.output
    assert "annotation id 7 refers to image id 3" in result.output
    assert "unknown category ids (annotation -> category): 6 -> 9" in result.output
    assert "are clipped: annotation ids 5" in result.output


def test_cli_json_output(taco_sample):
    result = CliRunner().invoke(main, ["inspect", str(taco_sample / "annotations.json"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["images"] == 102
    assert summary["annotations"] == 397
    assert summary["photos"]["found"] == 102


def test_plot_sizes_follow_content(tmp_path):
    assert plot_counts({"a": 1, "b": 2, "c": 3}, tmp_path / "c.png", "t", "x") == (900, 176)
    assert png_size(tmp_path / "c.png") == (900, 176)
    tiles = [Tile(np.full((8, 8, 1), 200, np.uint8), ["one", "two"], [Box(1, 1, 4, 4, "x")]) for _ in range(5)]
    size = plot_image_grid(tiles, tmp_path / "g.png", "grid", columns=2, tile_px=100)
    assert size == (216, 36 + 3 * (100 + 2 * 13 + 8))
    assert png_size(tmp_path / "g.png") == size
