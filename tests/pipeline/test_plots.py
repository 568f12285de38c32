"""The report heatmap is a real PNG of the right size, written atomically."""

from __future__ import annotations

from expertkit.pipeline.plots import heatmap


def test_heatmap_writes_png(tmp_path):
    out = heatmap([[0.1, 0.9], [None, 0.5]], ["base", "expert"], ["a", "b"], tmp_path / "h.png",
                  title="t", highlight=[(1, 1)])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 200
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]
