"""StopScanner: OpenAI's `stop` strings cut on the relayed text, across tokens."""

from api.openai.stops import StopScanner


def test_stop_scanner_cuts_at_a_stop_string_spanning_tokens():
    scanner = StopScanner(["END"])
    shown = [scanner.feed(piece) for piece in ["ab", "cE", "N", "Dxyz"]]
    assert shown == ["ab", "c", "", ""]
    assert scanner.stopped and scanner.text == "abc"
    assert scanner.tokens == 4


def test_stop_scanner_releases_a_held_back_tail_that_did_not_become_a_stop():
    scanner = StopScanner(["END"])
    assert scanner.feed("xE") == "x"
    assert scanner.feed("Nx") == "ENx"
    assert scanner.feed("EN") == ""
    assert scanner.finish() == "EN"
    assert not scanner.stopped


def test_stop_scanner_takes_the_earliest_of_several_stops():
    scanner = StopScanner(["\n\n", "b"])
    assert scanner.feed("a\n\nb") == "a"


def test_stop_scanner_without_stops_passes_everything():
    scanner = StopScanner([])
    assert scanner.feed("abc") == "abc"
    assert scanner.finish() == ""
