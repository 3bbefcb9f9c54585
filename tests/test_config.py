"""Configuration (fast, no model): the TOML file and flags merged into ServerConfig, and the one
definition of a worker's settings shared by the config, the supervisor and the worker's CLI."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from frontend.config import ConfigError, ModelConfig, ServerConfig, add_server_flags, load_config
from frontend.supervisor import auto_cores, worker_command
from worker.__main__ import build_parser
from worker.settings import ModelSettings, WorkerSettings, parse_cores


def parse(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    return load_config(parser.parse_args(list(argv)))


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_flags_describe_models_comma_separated(model_file):
    config = parse("--model-name", "a,b", "--model-path", f"{model_file},{model_file}", "--model-kind",
                   "chat,embedding", "--ctx-size", "1024", "--parallel", "2,3", "--workers", "0")
    a, b = config.models
    assert (a.name, a.kind, a.ctx_size, a.parallel, a.workers) == ("a", "chat", 1024, 2, 0)
    assert (b.name, b.kind, b.ctx_size, b.parallel, b.workers) == ("b", "embedding", 1024, 3, 0)
    assert config.port == ServerConfig.port and config.worker_addr.startswith("ipc://")


def test_config_file_with_flags_overriding(tmp_path, model_file):
    config_path = tmp_path / "edgellm.toml"
    config_path.write_text(f'port = 9000\nqueue_size = 3\nstore_path = "db/x.db"\n'
                           f'[[models]]\nname = "m"\npath = "{model_file.name}"\nctx_size = 512\n'
                           'cores = ["0"]\n')
    config = parse("--config", str(config_path), "--queue-size", "5", "--limit", "7")
    assert config.port == 9000 and config.queue_size == 5 and config.retrieve_limit == 7
    assert config.store_path == str(tmp_path / "db" / "x.db")
    [model] = config.models
    assert model.path == str(model_file) and model.ctx_size == 512 and model.cores == ["0"]
    assert model.batch_size == ModelSettings.batch_size  # defaults come from the one definition


def test_socket_addr_overrides_host_and_port(model_file):
    config = parse("--model-name", "m", "--model-path", str(model_file), "--socket-addr", ":9100")
    assert (config.host, config.port) == (ServerConfig.host, 9100)


@pytest.mark.parametrize("argv, message", [
    ([], "no model configured"),
    (["--model-name", "a,b", "--model-path", "{p}"], "lists 2 names"),
    (["--model-name", "a", "--model-path", "{p}", "--ctx-size", "0"], "ctx_size must be at least 1"),
    (["--model-name", "a", "--model-path", "{p}", "--model-kind", "vision"], "kind must be"),
    (["--model-name", "a", "--model-path", "{p}", "--parallel", "x"], "not a valid value"),
    (["--model-name", "a,b", "--model-path", "{p},{p}", "--parallel", "1,2,3"], "one value or one per model"),
    (["--model-name", "a", "--model-path", "/nonexistent/m.gguf"], "no file at"),
    (["--model-name", "a,a", "--model-path", "{p},{p}"], "configured twice"),
    (["--model-name", "a", "--model-path", "{p}", "--curve-authorized-keys", "k"], "needs curve_secret_key_file"),
    (["--model-name", "a", "--model-path", "{p}", "--model-kind", "embedding", "--rag-collection", "c"],
     None),
])
def test_bad_configurations_are_refused_with_a_reason(model_file, argv, message):
    argv = [a.replace("{p}", str(model_file)) for a in argv]
    if message is None:  # rag flags apply to chat models only, and are ignored for embedding models
        assert parse(*argv).models[0].rag_collection is None
        return
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_unknown_keys_in_the_config_file(tmp_path, model_file):
    config_path = tmp_path / "bad.toml"
    config_path.write_text(f'[[models]]\nname = "m"\npath = "{model_file}"\nctx = 5\n')
    with pytest.raises(ConfigError, match="unknown model setting"):
        parse("--config", str(config_path))
    config_path.write_text(f'prot = 1\n[[models]]\nname = "m"\npath = "{model_file}"\n')
    with pytest.raises(ConfigError, match="unknown server setting"):
        parse("--config", str(config_path))


def test_worker_command_line_round_trips_through_the_worker_cli(model_file):
    """The supervisor's argv for a worker parses back, in the worker's own CLI, into the same settings."""
    model = ModelConfig(name="m", path=str(model_file), kind="embedding", ctx_size=256, batch_size=64,
                        parallel=3, threads=2, n_gpu_layers=4, chat_template="{{ x }}", workers=2,
                        gpus=["0", "1"])
    argv = worker_command(model, "ipc:///tmp/w.ipc", 1, verbose=True, cores=["0", "1-2"])
    assert argv[1:3] == ["-m", "worker"]
    settings = WorkerSettings.from_args(build_parser().parse_args(argv[3:]))
    assert settings.model_settings() == model.model_settings()
    assert (settings.connect, settings.cores, settings.gpu, settings.verbose) == ("ipc:///tmp/w.ipc", "1-2", "1",
                                                                                   True)


def test_every_model_setting_is_a_worker_flag_and_a_config_key():
    worker_flags = {a.dest for a in build_parser()._actions}
    for f in fields(ModelSettings):
        assert f.name in worker_flags
        assert f.name in {g.name for g in fields(ModelConfig)}


def test_worker_cli_refuses_bad_settings(capsys):
    from worker.__main__ import main
    with pytest.raises(SystemExit):
        main(["--connect", "ipc:///x", "--model-name", "m", "--model-path", "m.gguf", "--parallel", "0"])
    assert "parallel must be at least 1" in capsys.readouterr().err


def test_cores():
    assert parse_cores("0,2-3") == [0, 2, 3]
    assert parse_cores(None) is None
    assert auto_cores(2, [0, 1, 2, 3]) == ["0,1", "2,3"]
    assert auto_cores(3, [0, 1]) == []


@pytest.mark.parametrize("toml, message", [
    ("queue_size = 0", "queue_size must be at least 1"),
    ("log_level = 'verbose'", "log_level must be one of"),
    ("retrieve_limit = 0", "retrieve_limit must be at least 1"),
    ("port = '8080'", "port must be an integer"),
    ("max_file_bytes = 20000000", "max_body_bytes must be larger than max_file_bytes"),
    ("[[models]]\nname = 'x'\npath = 'm.gguf'\nctx_size = '2048'", "ctx_size must be an integer"),
    ("[[models]]\nname = 'x'\npath = 'm.gguf'\nparallel = 8\nbatch_size = 8", "batch_size .8. must be larger"),
])
def test_config_file_values_are_checked(tmp_path, model_file, toml, message):
    config_path = tmp_path / "edgellm.toml"
    model = f'[[models]]\nname = "m"\npath = "{model_file}"\n'
    config_path.write_text(toml + "\n" + model if not toml.startswith("[[models]]") else toml + "\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=message):
        parse("--config", str(config_path))


def test_per_model_flags_override_the_config_files_models(tmp_path, model_file):
    config_path = tmp_path / "edgellm.toml"
    config_path.write_text(f'[[models]]\nname = "a"\npath = "{model_file}"\n[[models]]\nname = "b"\n'
                           f'path = "{model_file}"\nparallel = 2\n')
    a, b = parse("--config", str(config_path), "--parallel", "8").models
    assert a.parallel == b.parallel == 8


def test_socket_addr_without_a_port_is_refused(model_file):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse("--model-name", "m", "--model-path", str(model_file), "--socket-addr", "localhost")


# -- model aliases and sampling defaults (issue 10) ------------------------------------------------
def test_aliases_from_the_file_and_from_the_flag(tmp_path, model_file):
    config_path = tmp_path / "edgellm.toml"
    config_path.write_text(f'[[models]]\nname = "chat"\npath = "{model_file}"\naliases = ["gpt-4o-mini", "gpt-4o"]\n'
                           f'[[models]]\nname = "embed"\npath = "{model_file}"\nkind = "embedding"\n')
    config = parse("--config", str(config_path))
    assert config.aliases() == {"gpt-4o-mini": "chat", "gpt-4o": "chat"}
    # LlamaEdge's --model-alias: one alias per model, in order; an empty item gives none
    config = parse("--model-name", "a,b", "--model-path", f"{model_file},{model_file}", "--model-kind",
                   "chat,embedding", "--model-alias", ",text-embedding-3-small")
    assert config.aliases() == {"text-embedding-3-small": "b"}
    assert parse("--model-name", "a,b", "--model-path", f"{model_file},{model_file}",
                 "--model-alias", "x").aliases() == {"x": "a"}


@pytest.mark.parametrize("argv, message", [
    (["--model-alias", "b"], "alias 'b' is the name of a model"),
    (["--model-alias", "a,"], "alias 'a' is the name of a model"),
    (["--model-alias", "x,x"], "alias 'x' is already an alias of model 'a'"),
    (["--model-alias", "x,y,z"], "lists 3 values for 2 models"),
])
def test_an_alias_names_one_model(model_file, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse("--model-name", "a,b", "--model-path", f"{model_file},{model_file}", *argv)


def test_sampling_defaults_from_flags_apply_to_chat_models(model_file):
    config = parse("--model-name", "a,e", "--model-path", f"{model_file},{model_file}", "--model-kind",
                   "chat,embedding", "--temp", "0.1", "--top-p", "0.9", "--top-k", "20", "--min-p", "0.1",
                   "--repeat-penalty", "1.1", "--presence-penalty", "0.5", "--frequency-penalty", "-0.5",
                   "--n-predict", "100")
    chat, embedding = config.models
    assert chat.sampling_defaults() == {"temperature": 0.1, "top_p": 0.9, "top_k": 20, "min_p": 0.1,
                                        "repeat_penalty": 1.1, "presence_penalty": 0.5,
                                        "frequency_penalty": -0.5, "max_tokens": 100}
    assert embedding.sampling_defaults() == {}


def test_a_request_field_wins_over_the_model_default(tmp_path, model_file):
    config_path = tmp_path / "edgellm.toml"
    config_path.write_text(f'[[models]]\nname = "m"\npath = "{model_file}"\ntemperature = 0\nmax_tokens = 50\n')
    [model] = parse("--config", str(config_path)).models
    assert model.with_defaults({"messages": [], "temperature": 0.7}) == {"messages": [], "temperature": 0.7,
                                                                         "max_tokens": 50}
    assert model.with_defaults({"max_tokens": 3})["max_tokens"] == 3


@pytest.mark.parametrize("setting, message", [
    ("temperature = 3", "temperature must be at most 2"),
    ("top_p = -0.1", "top_p must be at least 0"),
    ("repeat_penalty = 0", "repeat_penalty must be above 0"),
    ("max_tokens = 4096", r"max_tokens \(4096\) must be below ctx_size \(2048\)"),
    ("presence_penalty = 'x'", "presence_penalty must be a number"),
    ("aliases = 'gpt-4o'", "aliases must be a list of strings"),
    ("aliases = ['']", "aliases must be non-empty names"),
    ("kind = 'embedding'\ntemperature = 0", r"sampling defaults \(temperature\) apply to chat models only"),
])
def test_bad_defaults_and_aliases_in_the_file(tmp_path, model_file, setting, message):
    config_path = tmp_path / "edgellm.toml"
    config_path.write_text(f'[[models]]\nname = "m"\npath = "{model_file}"\n{setting}\n')
    with pytest.raises(ConfigError, match=message):
        parse("--config", str(config_path))


def test_web_ui_is_on_unless_turned_off(tmp_path, model_file):
    flags = ("--model-name", "m", "--model-path", str(model_file))
    assert parse(*flags).web_ui is True
    assert parse(*flags, "--no-web-ui").web_ui is False
    toml = tmp_path / "edgellm.toml"
    toml.write_text(f'web_ui = false\n[[models]]\nname = "m"\npath = "{model_file}"\n')
    assert parse("--config", str(toml)).web_ui is False
    toml.write_text(f'web_ui = "no"\n[[models]]\nname = "m"\npath = "{model_file}"\n')
    with pytest.raises(ConfigError, match="web_ui must be true or false"):
        parse("--config", str(toml))
