"""`tls_context`: the TLS settings of the HTTP endpoints, and a clear error for every bad file."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from mesh.monitor.server import tls_context
from mesh.protocol import ConfigurationError, ErrorCode
from mesh.testing import self_signed_certificate


def refusal(cert: str | None, key: str | None) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as err:
        tls_context(cert, key)
    assert err.value.code == ErrorCode.CONFIGURATION
    return err.value


def test_no_files_no_tls_and_a_pair_gives_tls13_minimum(tmp_path: Path) -> None:
    """Neither file: plain HTTP. Both: a server context that accepts nothing below TLS 1.3."""
    assert tls_context(None, None) is None
    context = tls_context(*self_signed_certificate(tmp_path))
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_one_file_alone_is_refused(tmp_path: Path) -> None:
    """A certificate without its key (or the reverse) names the option that is missing."""
    cert, key = self_signed_certificate(tmp_path)
    assert "--tls-key" in refusal(cert, None).message
    assert refusal(None, key).details == {"missing": "--tls-cert"}


def test_a_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    """The error says which option, which path and why (no such file, permission denied)."""
    cert, key = self_signed_certificate(tmp_path)
    missing = str(tmp_path / "nowhere.pem")
    assert refusal(missing, key).message.startswith(f"--tls-cert: cannot read {missing}: No such file")
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    Path(key).chmod(0)
    assert refusal(cert, key).message == f"--tls-key: cannot read {key}: Permission denied"


def test_not_pem_or_another_certificates_key_is_refused(tmp_path: Path) -> None:
    """Garbage, or a key that does not belong to the certificate, fails at the start, not at the first client."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, _ = self_signed_certificate(tmp_path / "a")
    _, other_key = self_signed_certificate(tmp_path / "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert "not a PEM certificate" in refusal(str(garbage), other_key).message
    err = refusal(cert, other_key)
    assert "not a PEM certificate and its unencrypted key" in err.message
    assert err.details == {"cert": cert, "key": other_key}
