"""/reader_groups, /status and /config/{reader_id}: the live readers, in Takeoff's shapes."""

from shared import keys
from tests.support.api_fakes import add_reader

NO_LORAS = {"available": [], "loaded": [], "max_loaded": 0}
DEFAULTS = {
    "device": "cpu",
    "dtype": "float32",
    "quantization": "none",
    "fused_layers": 0,
    "joint_prefill": False,
    "batch_invariant": False,
    "prefix_cache_bytes": 0,
    "loras": NO_LORAS,
}


def test_reader_groups_lists_each_live_reader(management, connection):
    add_reader(connection, reader_id="a", pids=[1])
    add_reader(connection, reader_id="b", pids=[2], ready=False)
    add_reader(connection, reader_id="c", consumer_group="vision", model_type="VISION", model_name="vlm")
    add_reader(connection, reader_id="dead")
    connection.delete(keys.reader_key("dead"))
    body = management.get("/reader_groups").get_json()
    assert body == {
        "primary": [
            {
                "reader_id": "a",
                "model_name": "tiny-test-model",
                "model_type": "CAUSAL",
                "pids": [1],
                "ready": True,
                **DEFAULTS,
            },
            {
                "reader_id": "b",
                "model_name": "tiny-test-model",
                "model_type": "CAUSAL",
                "pids": [2],
                "ready": False,
                **DEFAULTS,
            },
        ],
        "vision": [
            {
                "reader_id": "c",
                "model_name": "vlm",
                "model_type": "VISION",
                "pids": [4242],
                "ready": True,
                **DEFAULTS,
            }
        ],
    }


def test_reader_groups_when_nothing_registered(management):
    assert management.get("/reader_groups").get_json() == {}


def test_status_maps_reader_ids_to_their_description(management, connection):
    info = add_reader(connection, reader_id="a", device="cuda", max_batch_size=16)
    body = management.get("/status").get_json()
    assert list(body) == ["live_readers"]
    entry = body["live_readers"]["a"]
    assert entry["consumer_groups"] == ["primary"]
    assert "consumer_group" not in entry
    assert entry["device"] == "cuda"
    assert entry["max_batch_size"] == 16
    assert entry["pids"] == info.pids
    assert entry["model_name"] == info.model_name


def test_config_of_a_live_reader(management, connection):
    info = add_reader(connection, reader_id="a")
    assert management.get("/config/a").get_json() == info.model_dump(mode="json")


def test_config_of_an_unknown_reader_is_404(management):
    response = management.get("/config/ghost")
    assert response.status_code == 404
    assert response.get_json()["error_type"] == "unknown_reader"
