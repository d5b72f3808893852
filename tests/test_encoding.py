"""Issue 18: undecodable input is counted per file, warned about, refused above 1%, and --encoding
decodes with the encoding the user names. Real files, real `memfit train` (in-process cli.main)."""

from __future__ import annotations

import random
from pathlib import Path

from memfit import cli
from memfit import config as C

FRENCH = ("L'été dernier, à Noël, le garçon déjà âgé mangeait des crêpes près de la forêt. "
          "Où est le château? Ça va très bien, merci. ") * 200


def tiny(data: list[str], out: Path, *extra: str) -> list[str]:
    return ["train", "--data", *data, "--text-split", "paragraph", "--target-params", "120k",
            "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--max-steps", "1",
            "--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0", "--quiet",
            "--preflight", "off", "--output-dir", str(out), *extra]


def _paragraphs(text: str) -> str:
    return "\n\n".join(text[i:i + 400] for i in range(0, len(text), 400))


def test_binary_and_foreign_encoded_files_are_refused_before_writing(tmp_path, capsys):
    binary = tmp_path / "weights.txt"
    rng = random.Random(0)
    binary.write_bytes(bytes(rng.randrange(256) for _ in range(40_000)))
    latin1 = tmp_path / "french.txt"
    latin1.write_bytes(_paragraphs(FRENCH).encode("latin-1"))
    out = tmp_path / "run"
    rc = cli.main(tiny([str(binary), str(latin1)], out))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{binary}:" in err and f"{latin1}:" in err and "more than 1%" in err and "--encoding" in err, err
    assert not out.exists()


def test_encoding_flag_decodes_latin1_and_a_few_bad_bytes_are_a_warning_with_the_count(tmp_path, capsys):
    latin1 = tmp_path / "french.txt"
    latin1.write_bytes(_paragraphs(FRENCH).encode("latin-1"))
    from memfit.data.sources import iter_split_texts
    cfg = C.Config(task="pretrain").replace(data={"data": (str(latin1),), "encoding": "latin-1",
                                                  "text_split": "paragraph"})
    text = "".join(iter_split_texts(cfg, role="train"))
    assert "été" in text and "\ufffd" not in text
    rc = cli.main(tiny([str(latin1)], tmp_path / "run", "--encoding", "latin-1"))
    assert rc == 0, capsys.readouterr().err

    mostly = tmp_path / "mostly_utf8.txt"
    mostly.write_bytes(_paragraphs(FRENCH).encode("utf-8") + b"\n\nna\xefve caf\xe9 \xff\n")
    rc = cli.main(tiny([str(mostly)], tmp_path / "run2"))
    assert rc == 0, capsys.readouterr().err
    log = (tmp_path / "run2" / "memfit.log").read_text()
    assert f"{mostly}: 3 undecodable byte sequence(s) as utf-8" in log, log

    rc = cli.main(tiny([str(latin1)], tmp_path / "run3", "--encoding", "utf-16"))
    assert rc == 2 and "ASCII-compatible" in capsys.readouterr().err


def test_the_bbc_corpus_with_its_one_latin1_file_still_passes_the_check():
    from memfit.data.check import check_data, encoding_warnings
    cfg = C.Config(task="pretrain").replace(data={"data": ("bbc",)})
    assert check_data(cfg) == []
    warnings = encoding_warnings(cfg)
    assert len(warnings) == 1 and "sports/199.txt: 1 undecodable" in warnings[0], warnings
