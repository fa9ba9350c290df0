"""csv_text is the one writer of instill's tables."""
import csv
import io

from instill.files import atomic_write_csv, csv_text


def test_csv_text_orders_columns_fills_gaps_and_leaves_out_extras(tmp_path):
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "acc": 0.9, "loss": 0.25}]
    assert csv_text(rows) == "step,loss,acc\r\n1,0.5,\r\n2,0.25,0.9\r\n"
    assert list(csv.DictReader(io.StringIO(csv_text(rows, ["acc", "step"])))) == [
        {"acc": "", "step": "1"}, {"acc": "0.9", "step": "2"}]
    atomic_write_csv(tmp_path / "t.csv", rows, ["step"])
    assert (tmp_path / "t.csv").read_bytes() == b"step\r\n1\r\n2\r\n"
