"""`make demo` end to end on one real clip with one step per stage: every report file is written."""
import json

from opensora_vae import demo


def test_demo_writes_its_report(tmp_path, sample_videos):
    csv = tmp_path / "one.csv"
    csv.write_text(f"path\n{sample_videos['carphone_pristine']}\n")
    demo.main(["--out", str(tmp_path / "demo"), "--data-path", str(csv), "--steps", "1,1,2", "--image-size", "16"])
    out = tmp_path / "demo"
    for name in ("report.html", "loss.png", "frames.png", "metrics.json", "summary.json"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "metrics.json").read_text())
    assert 0 < scores["rec"]["metrics"]["psnr"]["mean"] < 100
    assert scores["rec"]["metrics"]["lpips"]["available"] in (True, False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_per_stage"] == [1, 1, 2] and len(summary["clips"]) == 1
    assert (out / "recon_rec" / "carphone_pristine.mp4").is_file()
