"""The bench commands' --help: a description that ends in a full sentence."""

import pytest


@pytest.mark.parametrize("module", ["bench.gpu_check", "bench.report", "bench.quality"])
def test_help_description_is_whole_sentences(capsys, module):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    description = " ".join(text.split("\n\n")[1].split())  # after the usage paragraph
    assert description.endswith("."), description
