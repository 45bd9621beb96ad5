"""TLS for gRPC and REST from TF Serving's ``--ssl_config_file``: an ``SSLConfig`` text proto
(tensorflow_serving/config/ssl_config.proto) holding PEM text, not file names:

    server_key: "-----BEGIN PRIVATE KEY-----\\n..."     # the server's private key
    server_cert: "-----BEGIN CERTIFICATE-----\\n..."    # its certificate (chain)
    custom_ca: "-----BEGIN CERTIFICATE-----\\n..."      # CA that client certificates must be signed by
    client_verify: true                                # mutual TLS: every client presents such a certificate

Clients (``serving.client``, ``seminar-tf query --ssl-config-file``) read the same format: ``custom_ca`` is
the CA that signed the server's certificate (the system's CAs when empty) and ``server_key`` /
``server_cert``, when set, are the client's own key and certificate for a server with ``client_verify``.

The SSLConfig message is not in the tensorflow-serving-api package; its four fields are declared here and
parsed with protobuf's text format, so the file reads exactly as TF Serving reads it.
"""

from __future__ import annotations

import os
import ssl
import tempfile

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from serving.errors import StartupError


def _ssl_config_class():
    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(name="tensorflow_serving/config/ssl_config.proto",
                                               package="tensorflow.serving", syntax="proto3")
    message = proto.message_type.add(name="SSLConfig")
    field = descriptor_pb2.FieldDescriptorProto
    for number, (name, kind) in enumerate([("server_key", field.TYPE_STRING), ("server_cert", field.TYPE_STRING),
                                           ("custom_ca", field.TYPE_STRING), ("client_verify", field.TYPE_BOOL)], 1):
        message.field.add(name=name, number=number, type=kind, label=field.LABEL_OPTIONAL)
    return message_factory.GetMessageClass(pool.Add(proto).message_types_by_name["SSLConfig"])


SSLConfig = _ssl_config_class()


def read_ssl_config(path: str, server: bool = True):
    """The SSLConfig of ``path``; StartupError naming the file when it cannot be used (a server needs
    server_key and server_cert; client_verify needs custom_ca)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise StartupError(f"--ssl-config-file {path}: {err.strerror or err}") from None
    config = SSLConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise StartupError(f"--ssl-config-file {path}: not an SSLConfig text proto: {err}") from None
    if server and not (config.server_key and config.server_cert):
        raise StartupError(f"--ssl-config-file {path}: a server needs both server_key and server_cert (PEM text)")
    if bool(config.server_key) != bool(config.server_cert):
        raise StartupError(f"--ssl-config-file {path}: give both server_key and server_cert, or neither")
    if server and config.client_verify and not config.custom_ca:
        raise StartupError(f"--ssl-config-file {path}: client_verify needs custom_ca (the CA of the client "
                           "certificates)")
    return config


def _load_chain(context: ssl.SSLContext, key: str, cert: str) -> None:
    """ssl loads a key pair from files only: a private temporary directory holds them for the call."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, pem in (("key.pem", key), ("cert.pem", cert)):
            path = os.path.join(tmp, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
                f.write(pem)
            paths.append(path)
        context.load_cert_chain(certfile=paths[1], keyfile=paths[0])


def server_ssl_context(config) -> ssl.SSLContext:
    """REST's TLS context (also validates the PEM text for gRPC, whose errors would come late and vague)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        _load_chain(context, config.server_key, config.server_cert)
        if config.custom_ca:
            context.load_verify_locations(cadata=config.custom_ca)
    except (ssl.SSLError, ValueError) as err:
        raise StartupError(f"SSL config: unusable server_key / server_cert / custom_ca: {err}") from None
    if config.client_verify:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def grpc_server_credentials(config) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() if config.custom_ca else None,
        require_client_auth=bool(config.client_verify))


def grpc_channel_credentials(config) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=config.custom_ca.encode() if config.custom_ca else None,
        private_key=config.server_key.encode() if config.server_key else None,
        certificate_chain=config.server_cert.encode() if config.server_cert else None)


def client_ssl_context(config) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=config.custom_ca or None)
    if config.server_key:
        _load_chain(context, config.server_key, config.server_cert)
    return context
