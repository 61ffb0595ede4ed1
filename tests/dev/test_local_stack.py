"""Pure parts of the local stack launcher."""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
import stat

import pytest

from metering_dev.stack.apache_kafka import Quorum, SaslListener, ScramUser, new_cluster_id, write_config
from metering_dev.stack.certificates import ensure_server_certificate
from metering_dev.stack.local import LocalStack, StackConfig, StackError, StackState


def test_kraft_cluster_ids_never_look_like_an_option():
    ids = [new_cluster_id() for _ in range(2000)]  # a plain random id starts with '-' 1 time in 64
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)


def test_a_scram_user_reaches_the_storage_tool_salted_never_in_clear():
    user = ScramUser.generate("SCRAM-SHA-512")
    argument = user.storage_argument()
    assert user.password not in argument
    match = re.fullmatch(
        r'SCRAM-SHA-512=\[name=metering,iterations=(\d+),salt="([^"]+)",saltedpassword="([^"]+)"\]', argument
    )
    assert match, argument
    iterations, salt, salted = int(match[1]), base64.b64decode(match[2]), base64.b64decode(match[3])
    assert iterations >= 4096  # Kafka's minimum for SCRAM
    assert salted == hashlib.pbkdf2_hmac("sha512", user.password.encode(), salt, iterations)  # RFC 5802's Hi()
    assert ScramUser.generate().password != user.password


def test_the_sasl_ssl_listener_is_added_beside_the_plaintext_ones(tmp_path):
    certificate = ensure_server_certificate(tmp_path / "tls")
    single = Quorum("id", (9092,), (9093,))
    config = write_config(tmp_path / "kafka", single, 1, SaslListener(9094, "SCRAM-SHA-512", certificate))
    properties = dict(line.split("=", 1) for line in config.read_text().splitlines())
    assert properties["listeners"] == (
        "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093,SASL_SSL://127.0.0.1:9094"
    )
    assert properties["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092,SASL_SSL://127.0.0.1:9094"
    assert properties["inter.broker.listener.name"] == "PLAINTEXT"
    assert properties["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert "ScramLoginModule required" in properties["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    assert properties["listener.name.sasl_ssl.ssl.keystore.location"] == str(certificate.keystore_file)
    plain = dict(line.split("=", 1) for line in write_config(tmp_path / "plain", single).read_text().splitlines())
    assert plain["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert not [key for key in plain if "sasl" in key or "ssl" in key]


def _properties(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_each_node_of_a_three_broker_cluster_knows_every_controller_and_replicates_kafkas_own_topics(tmp_path):
    quorum = Quorum("cluster", (9092, 9093, 9094), (19092, 19093, 19094))
    nodes = [_properties(write_config(tmp_path / f"kafka-{n}", quorum, n)) for n in (1, 2, 3)]
    assert [node["node.id"] for node in nodes] == ["1", "2", "3"]
    assert {node["controller.quorum.voters"] for node in nodes} == {
        "1@127.0.0.1:19092,2@127.0.0.1:19093,3@127.0.0.1:19094"
    }
    assert [node["listeners"] for node in nodes] == [
        f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 10000}" for port in (9092, 9093, 9094)
    ]
    assert len({node["log.dirs"] for node in nodes}) == 3
    for node in nodes:
        assert node["offsets.topic.replication.factor"] == node["transaction.state.log.replication.factor"] == "3"
        assert node["transaction.state.log.min.isr"] == "2" and node["default.replication.factor"] == "3"
        assert "min.insync.replicas" not in node  # the product sets it on its own topics
    alone = _properties(write_config(tmp_path / "alone", Quorum("cluster", (9092,), (19092,))))
    assert alone["controller.quorum.voters"] == "1@127.0.0.1:19092"
    assert alone["transaction.state.log.replication.factor"] == alone["transaction.state.log.min.isr"] == "1"


def test_a_cluster_is_given_to_clients_as_the_list_of_its_brokers():
    state = StackState("apache", 9092, 8123, "4.1.1", more_kafka_ports=(9093, 9094))
    assert state.kafka_bootstrap == "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"
    assert state.kafka_address(2) == "127.0.0.1:9093"
    assert StackState("apache", 9092, 8123, "4.1.1").kafka_bootstrap == "127.0.0.1:9092"


def test_a_cluster_of_tansu_or_with_a_sasl_listener_is_refused_before_anything_starts(tmp_path):
    for broker, sasl_port in (("tansu", None), ("apache", 3)):
        config = StackConfig(
            data_dir=tmp_path / "stack",
            broker=broker,
            kafka_port=1,
            clickhouse_port=2,
            kafka_version="4.1.1",
            kafka_heap="256m",
            cache_dir=tmp_path,
            sasl_port=sasl_port,
            more_kafka_ports=(4, 5),
        )
        with pytest.raises(StackError, match="needs --broker apache"):
            LocalStack(config.data_dir).up(config)
    assert not (tmp_path / "stack").exists()


def test_a_restarted_node_keeps_the_clusters_controllers_and_a_cluster_of_another_size_is_refused(tmp_path):
    stack = LocalStack(tmp_path / "stack")
    stack.data_dir.mkdir()
    three = StackState("apache", 9092, 8123, "4.1.1", more_kafka_ports=(9093, 9094))
    first = stack._quorum(three)
    assert first.size == 3 and len(set(first.controller_ports)) == 3 and first.cluster_id
    assert stack._quorum(three).cluster_id == first.cluster_id  # nothing runs: new ports, same cluster
    node = stack.kafka_node(2)
    node.start(["sh", "-c", "sleep 30", str(stack.data_dir)])  # a live process of this data dir stands for node 2
    try:
        kept = stack._quorum(three)
        assert stack._quorum(three) == kept  # node 1 or 3 restarting finds the controllers where they are
    finally:
        node.kill()
    (stack.data_dir / "kafka" / "data").mkdir(parents=True)
    (stack.data_dir / "kafka" / "data" / "meta.properties").write_text(f"cluster.id={first.cluster_id}\n")
    with pytest.raises(StackError, match="a cluster of 3 broker"):
        stack._quorum(StackState("apache", 9092, 8123, "4.1.1"))
    older = LocalStack(tmp_path / "older")  # formatted before kafka-quorum.json existed: its own id is kept
    (older.data_dir / "kafka" / "data").mkdir(parents=True)
    (older.data_dir / "kafka" / "data" / "meta.properties").write_text("version=1\ncluster.id=abc\n")
    assert older._quorum(StackState("apache", 9092, 8123, "4.1.1")).cluster_id == "abc"


def test_the_generated_certificate_verifies_for_localhost_and_127_0_0_1_and_keys_stay_private(tmp_path):
    certificate = ensure_server_certificate(tmp_path / "tls")
    for private in (certificate.key_file, certificate.keystore_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert ensure_server_certificate(tmp_path / "tls") == certificate  # reused, not regenerated
    assert certificate.ca_file.read_bytes() in certificate.cert_file.read_bytes()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificate.cert_file, certificate.key_file)
    trusting = ssl.create_default_context(cafile=str(certificate.ca_file))
    for host in ("localhost", "127.0.0.1"):
        handshake(server, trusting, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, trusting, "example.com")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, ssl.create_default_context(), "localhost")  # the system's CAs do not know ours
    other = ensure_server_certificate(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, ssl.create_default_context(cafile=str(other.ca_file)), "localhost")


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> None:
    """A TLS handshake through memory buffers (no sockets): raises what the client raises."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out, server_hostname=host)
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if name == "client":
                        raise
                    done[name] = True  # the server's view of a client that gave up
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_stack_state_of_older_data_dirs_still_loads_and_tls_changes_the_url():
    old = StackState(broker="apache", kafka_port=9092, clickhouse_port=8123, kafka_version="4.1.1")
    assert (old.clickhouse_url, old.kafka_sasl_bootstrap) == ("http://127.0.0.1:8123", None)
    secured = StackState("apache", 9092, 8123, "4.1.1", sasl_port=9094, clickhouse_tls=True)
    assert (secured.clickhouse_url, secured.kafka_sasl_bootstrap) == ("https://127.0.0.1:8123", "127.0.0.1:9094")


def test_a_sasl_listener_on_tansu_is_refused_before_anything_starts(tmp_path):
    config = StackConfig(
        data_dir=tmp_path / "stack",
        broker="tansu",
        kafka_port=1,
        clickhouse_port=2,
        kafka_version="4.1.1",
        kafka_heap="256m",
        cache_dir=tmp_path,
        sasl_port=3,
    )
    with pytest.raises(StackError, match="needs --broker apache"):
        LocalStack(config.data_dir).up(config)
    assert not (tmp_path / "stack").exists()


def test_the_sasl_user_is_kept_with_the_data_dir_and_a_storage_formatted_without_it_is_refused(tmp_path):
    stack = LocalStack(tmp_path / "stack")
    kafka_dir = tmp_path / "stack" / "kafka"
    user = stack._sasl_user(kafka_dir)
    stack.data_dir.mkdir(parents=True)
    stack._write_sasl_client_env(StackState("apache", 1, 2, "4.1.1", sasl_port=3), user)
    assert stat.S_IMODE(stack.sasl_client_env_file.stat().st_mode) == 0o600
    assert stack._sasl_user(kafka_dir) == user
    assert stack.sasl_client_env()["METERING_KAFKA_BOOTSTRAP"] == "127.0.0.1:3"

    fresh = LocalStack(tmp_path / "formatted-without")
    (fresh.data_dir / "kafka" / "data").mkdir(parents=True)
    (fresh.data_dir / "kafka" / "data" / "meta.properties").write_text("cluster.id=x\n")
    with pytest.raises(StackError, match="formatted without a SASL user"):
        fresh._sasl_user(fresh.data_dir / "kafka")
