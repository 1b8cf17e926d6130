"""Writes aimass/client/generated.py: a typed method per public aimass.v1 RPC, blocking and asyncio, from one template.

setup.py runs it on every build, right after generating aimass.v1 (the file is git-ignored like aimass/v1 and never
edited by hand); ``python aimass/client/codegen.py`` rewrites it, ``--check`` says whether it is current.
It reads the contract as protoc parsed it (a FileDescriptorSet with source info), so method docstrings are the
protos' own comments, and it imports nothing but the standard library and protobuf: it runs in an isolated build
environment before the aimass package is importable.

The shape of a method, from its request message:
- unary / server-streaming RPCs take the whole request (``request``, positional) or its fields as keywords:
  scalars with their proto defaults, repeated fields as ``Sequence``, maps as ``Mapping``, messages as the generated
  class (``ModelRef``/``DatasetRef`` also as a plain name), enums as ``int``, optional/oneof fields as ``X | None``.
  ``RequestMeta meta`` becomes ``request_id=`` / ``priority=``.
- client-streaming RPCs take an iterable of requests (async: also an async iterable).
- every method takes ``timeout_s=`` (else the client's default) and ``request_id=`` (sent as x-request-id too).
- unary and client-streaming RPCs return the response; server streams iterate (``Iterator`` / ``AsyncIterator``).
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

PACKAGE = "aimass.v1"
# Services only mesh processes call (the gateway refuses them from clients: gateway.app.INTERNAL_SERVICES).
INTERNAL_SERVICES = frozenset(
    {
        "aimass.v1.SchedulerService",
        "aimass.v1.RegistryService",
        "aimass.v1.BlobService",
        "aimass.v1.TrainerService",
        "aimass.v1.ModelHostService",
    }
)
REQUEST_META = ".aimass.v1.RequestMeta"
# Reference messages a caller may give as a plain name: model="qwen" means ModelRef(name="qwen").
NAMED_REFS = frozenset({".aimass.v1.ModelRef", ".aimass.v1.DatasetRef"})
# Keywords every method has: a field of the same name would be shadowed, so the generator refuses it.
RESERVED = frozenset({"self", "request", "requests", "request_id", "priority", "timeout_s"})
# Attributes of the clients themselves, which a service group must not take.
CLIENT_ATTRIBUTES = frozenset({"channel", "target", "timeout_s", "max_attempts", "close", "call_options", "stub"})
# Attributes of a service group (calls.Group and the generated classes), which a method must not take.
GROUP_ATTRIBUTES = frozenset({"options", "stub", "service"})
OUTPUT = Path("aimass") / "client" / "generated.py"

FDP = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    FDP.TYPE_DOUBLE: ("float", "0.0"),
    FDP.TYPE_FLOAT: ("float", "0.0"),
    FDP.TYPE_INT64: ("int", "0"),
    FDP.TYPE_UINT64: ("int", "0"),
    FDP.TYPE_INT32: ("int", "0"),
    FDP.TYPE_FIXED64: ("int", "0"),
    FDP.TYPE_FIXED32: ("int", "0"),
    FDP.TYPE_UINT32: ("int", "0"),
    FDP.TYPE_SFIXED32: ("int", "0"),
    FDP.TYPE_SFIXED64: ("int", "0"),
    FDP.TYPE_SINT32: ("int", "0"),
    FDP.TYPE_SINT64: ("int", "0"),
    FDP.TYPE_BOOL: ("bool", "False"),
    FDP.TYPE_STRING: ("str", '""'),
    FDP.TYPE_BYTES: ("bytes", 'b""'),
    FDP.TYPE_ENUM: ("int", "0"),
}


class ContractError(Exception):
    """The contract has something the generator cannot map to Python names (says which and why)."""


def snake(name: str) -> str:
    """``WhoAmI`` → ``who_am_i``, ``ListAuditEvents`` → ``list_audit_events``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def descriptor_set(root: Path) -> descriptor_pb2.FileDescriptorSet:
    """protos/aimass/v1 parsed by protoc (grpcio-tools, a build requirement), with comments and imports."""
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    proto_root = root / "protos"
    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "aimass" / "v1").glob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "contract.binpb"
        args = ["protoc", f"-I{proto_root}", f"-I{well_known}", "--include_imports", "--include_source_info"]
        if protoc.main([*args, f"--descriptor_set_out={out}", *protos]) != 0:
            raise RuntimeError("protoc failed on " + " ".join(protos))
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@dataclass(frozen=True)
class Message:
    proto: descriptor_pb2.DescriptorProto
    python: str  # "nlp_pb2.EmbedRequest"
    comments: dict[str, str]  # field name → its leading comment


class Contract:
    """Lookups over a FileDescriptorSet: message types by full name, Python modules, comments."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = list(files.file)
        self.messages: dict[str, Message] = {}
        self.modules: dict[str, str] = {}  # proto file → "from aimass.v1 import nlp_pb2"
        for file in self.files:
            package, _, module = file.name.removesuffix(".proto").replace("/", ".").rpartition(".")
            self.modules[file.name] = f"from {package} import {module}_pb2" if package else f"import {module}_pb2"
            comments = _comments(file)
            for index, message in enumerate(file.message_type):
                self._add(
                    file,
                    message,
                    f"{module}_pb2.{message.name}",
                    f".{file.package}.{message.name}",
                    comments,
                    (4, index),
                )

    def _add(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        message: descriptor_pb2.DescriptorProto,
        python: str,
        full_name: str,
        comments: dict[tuple[int, ...], str],
        path: tuple[int, ...],
    ) -> None:
        fields = {field.name: comments.get((*path, 2, i), "") for i, field in enumerate(message.field)}
        self.messages[full_name] = Message(message, python, fields)
        for index, nested in enumerate(message.nested_type):
            self._add(
                file, nested, f"{python}.{nested.name}", f"{full_name}.{nested.name}", comments, (*path, 3, index)
            )

    def module_of(self, python: str) -> str:
        return python.split(".")[0]


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(location.path): textwrap.dedent(location.leading_comments).strip()
        for location in file.source_code_info.location
        if location.leading_comments.strip()
    }


@dataclass(frozen=True)
class Param:
    name: str  # the Python keyword
    field: str  # the proto field name
    annotation: str
    default: str
    doc: str


def _params(contract: Contract, message: Message) -> tuple[list[Param], bool]:
    """Keyword parameters for the request's fields, and whether it has a ``RequestMeta meta``."""
    params: list[Param] = []
    has_meta = False
    for field in message.proto.field:
        if field.type == FDP.TYPE_MESSAGE and field.type_name == REQUEST_META and field.name == "meta":
            has_meta = True
            continue
        name = f"{field.name}_" if keyword.iskeyword(field.name) else field.name
        if name in RESERVED:
            raise ContractError(f"{message.python}.{field.name} clashes with the client's own keyword {name!r}")
        repeated = field.label == FDP.LABEL_REPEATED
        entry = contract.messages.get(field.type_name) if field.type == FDP.TYPE_MESSAGE else None
        if entry is not None and entry.proto.options.map_entry:
            key, value = (_element(contract, f) for f in entry.proto.field)
            annotation, default = f"Mapping[{key}, {value}] | None", "None"
        elif repeated:
            annotation, default = f"Sequence[{_element(contract, field)}]", "()"
        elif field.type == FDP.TYPE_MESSAGE:
            named = " | str" if field.type_name in NAMED_REFS else ""
            annotation, default = f"{_element(contract, field)}{named} | None", "None"
        elif field.proto3_optional or field.HasField("oneof_index"):
            annotation, default = f"{SCALARS[field.type][0]} | None", "None"
        else:
            annotation, default = SCALARS[field.type]
        params.append(Param(name, field.name, annotation, default, message.comments.get(field.name, "")))
    return params, has_meta


def _element(contract: Contract, field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type == FDP.TYPE_MESSAGE:
        return contract.messages[field.type_name].python
    return SCALARS[field.type][0]


@dataclass(frozen=True)
class Group:
    attribute: str  # "nlp"
    cls: str  # "NlpService"
    full_name: str  # "aimass.v1.NlpService"
    grpc_module: str  # "nlp_pb2_grpc"
    service: descriptor_pb2.ServiceDescriptorProto
    doc: str
    method_docs: list[str]


def public_groups(contract: Contract) -> list[Group]:
    """Every public service, named for its file when it is the file's only public one (``datasets.proto`` →
    ``datasets``), else for itself (``FooService`` → ``foo``)."""
    groups: list[Group] = []
    for file in contract.files:
        if file.package != PACKAGE:
            continue
        comments = _comments(file)
        public = [(i, s) for i, s in enumerate(file.service) if f"{PACKAGE}.{s.name}" not in INTERNAL_SERVICES]
        module = file.name.removesuffix(".proto").rpartition("/")[2]
        for index, service in public:
            attribute = module if len(public) == 1 else snake(service.name.removesuffix("Service"))
            if attribute in CLIENT_ATTRIBUTES or keyword.iskeyword(attribute):
                raise ContractError(f"{service.name} would be client.{attribute}, a name the clients use already")
            for method in service.method:
                if snake(method.name) in GROUP_ATTRIBUTES:
                    raise ContractError(f"{service.name}.{method.name} would hide the group's own {snake(method.name)}")
            method_docs = [comments.get((6, index, 2, m), "") for m in range(len(service.method))]
            groups.append(
                Group(
                    attribute,
                    service.name,
                    f"{PACKAGE}.{service.name}",
                    f"{module}_pb2_grpc",
                    service,
                    comments.get((6, index), ""),
                    method_docs,
                )
            )
    names = [g.attribute for g in groups]
    if len(set(names)) != len(names):
        raise ContractError(f"two public services would share a client attribute: {sorted(names)}")
    return sorted(groups, key=lambda g: g.attribute)


def _docstring(text: str, indent: str) -> str:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"').strip()
    lines = text.splitlines() or [""]
    body = "\n".join(f"{indent}{line}".rstrip() for line in lines[1:])
    return f'{indent}"""{lines[0]}' + (f"\n{body}\n{indent}" if body else "") + '"""'


CLIENT_STREAM_NOTE = (
    "Never retried by the client (client streams are left out of its retry policy: aimass.client.channels); on an\n"
    "error, send the whole stream again."
)
STREAM_NOTE = (
    "gRPC retries a stream (UNAVAILABLE, RESOURCE_EXHAUSTED) only until the server answers; once a response has\n"
    "arrived, a failure midway reaches the caller as the RpcError. Stopping early (break, close) cancels the call."
)


def _method(contract: Contract, group: Group, index: int, is_async: bool) -> str:
    method = group.service.method[index]
    request = contract.messages[method.input_type]
    response = contract.messages[method.output_type].python
    name = snake(method.name)
    doc = group.method_docs[index] or f"The {method.name} RPC."
    options = "**self.options(timeout_s, request_id)"
    lines: list[str] = []
    if method.client_streaming:
        iterable = f"Iterable[{request.python}]"
        if is_async:
            iterable += f" | AsyncIterable[{request.python}]"
        signature = [f"requests: {iterable},", "/,", "*,", 'request_id: str = "",', "timeout_s: float | None = None,"]
        doc += f"\n\nSend ``{request.python.split('.', 1)[1]}`` messages in order (a generator streams them as made)."
        doc += "\n\n" + CLIENT_STREAM_NOTE
        argument = "iterate(requests)" if is_async else "iter(requests)"
        call = f"self.stub.{method.name}({argument}, {options})"
    else:
        params, has_meta = _params(contract, request)
        signature = [f"request: {request.python} | None = None,", "/,", "*,"]
        signature += [f"{p.name}: {p.annotation} = {p.default}," for p in params]
        signature += ['request_id: str = "",'] + (["priority: int = 0,"] if has_meta else [])
        signature += ["timeout_s: float | None = None,"]
        entries = [f'"{p.field}": {p.name}' for p in params]
        fields = ["    {" + ", ".join(entries) + "},"]
        if len(fields[0]) > 96:
            fields = ["    {", *(f"        {entry}," for entry in entries), "    },"]
        lines += ["message = build(", f"    {request.python},", "    request,", *fields, "    request_id=request_id,"]
        lines += ["    priority=priority,", ")"] if has_meta else [")"]
        call = f"self.stub.{method.name}(message, {options})"
        described = [f"{p.name}: {p.doc}" for p in params if p.doc]
        doc += f"\n\nPass a whole ``{request.python.split('.', 1)[1]}`` or its fields as keywords"
        doc += ", ``request_id``/``priority`` for its ``meta``." if has_meta else "."
        if described:
            doc += "\n\n" + "\n".join(described)
    if method.server_streaming:
        returns = f"{'AsyncIterator' if is_async else 'Iterator'}[{response}]"
        doc += "" if method.client_streaming else "\n\n" + STREAM_NOTE
        lines.append(f"call = {call}")
        lines.append("try:")
        lines += ["    async for response in call:", "        yield response"] if is_async else ["    yield from call"]
        lines += ["finally:", "    call.cancel()"]
    else:
        returns = response
        lines.append(f"return {'await ' if is_async else ''}{call}")
    head = f"    {'async ' if is_async else ''}def {name}(\n"
    head += "".join(f"        {part}\n" for part in ["self,", *signature])
    head += f"    ) -> {returns}:\n"
    return head + _docstring(doc, " " * 8) + "\n" + "".join(f"        {line}\n" for line in lines)


def _group(contract: Contract, group: Group, is_async: bool) -> str:
    prefix = "Async" if is_async else ""
    session = "AsyncSession" if is_async else "SyncSession"
    stub = f"{group.grpc_module}.{group.cls}Stub"
    stub_type = f"{group.grpc_module}.{group.cls}AsyncStub" if is_async else stub
    doc = (group.doc or group.full_name) + f"\n\n``{group.full_name}``; ``stub`` is the raw generated stub."
    text = f"class {prefix}{group.cls}({prefix}Group):\n{_docstring(doc, '    ')}\n\n"
    text += f'    service: ClassVar[str] = "{group.full_name}"\n\n'
    text += f"    def __init__(self, session: {session}) -> None:\n"
    text += "        super().__init__(session)\n"
    text += f"        self.stub: {stub_type} = {stub}(session.channel)\n"
    for index in range(len(group.service.method)):
        text += "\n" + _method(contract, group, index, is_async)
    return text


def render(files: descriptor_pb2.FileDescriptorSet) -> str:
    """The source of aimass/client/generated.py for this contract."""
    contract = Contract(files)
    groups = public_groups(contract)
    classes = [f"{prefix}{g.cls}" for g in groups for prefix in ("", "Async")]
    modules: set[str] = set()
    for group in groups:
        modules.add(f"from {PACKAGE} import {group.grpc_module}")
        for method in group.service.method:
            for message in (contract.messages[method.input_type], contract.messages[method.output_type]):
                modules.update(_imports(contract, message))
    abcs = {"AsyncIterable", "AsyncIterator", "Iterable", "Iterator", "Sequence"}
    abcs |= {"Mapping"} if any(_has_map(contract, g) for g in groups) else set()
    out = [
        '"""Generated from protos/aimass/v1 by aimass/client/codegen.py (setup.py runs it). Do not edit."""',
        "",
        "from __future__ import annotations",
        "",
        f"from collections.abc import {', '.join(sorted(abcs))}",
        "from typing import ClassVar, Final",
        "",
        "from aimass.client.calls import AsyncGroup, AsyncSession, Group, SyncSession, build, iterate",
        *_import_block(modules),
        "",
        "__all__ = [",
        '    "PUBLIC_SERVICES",',
        *(f'    "{name}",' for name in sorted(["AsyncServices", "Services", *classes])),
        "]",
        "",
        "# Every public service and the client attribute that holds its methods.",
        "PUBLIC_SERVICES: Final = {",
        *(f'    "{g.full_name}": "{g.attribute}",' for g in groups),
        "}",
        "",
    ]
    for group in groups:
        out += ["", _group(contract, group, False), "", _group(contract, group, True)]
    for prefix, kind in (("", "blocking"), ("Async", "asyncio")):
        session = f"{prefix or 'Sync'}Session"
        out += [
            "",
            f"class {prefix}Services:",
            f'    """Every public service, its RPCs as typed methods ({kind})."""',
            "",
        ]
        out += [f"    {g.attribute}: {prefix}{g.cls}" for g in groups]
        out += ["", f"    def open_services(self, session: {session}) -> None:"]
        out += [f"        self.{g.attribute} = {prefix}{g.cls}(session)" for g in groups]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _has_map(contract: Contract, group: Group) -> bool:
    for method in group.service.method:
        for field in contract.messages[method.input_type].proto.field:
            entry = contract.messages.get(field.type_name) if field.type == FDP.TYPE_MESSAGE else None
            if entry is not None and entry.proto.options.map_entry:
                return True
    return False


def _import_block(statements: set[str]) -> list[str]:
    """``from aimass.v1 import a`` and ``... import b`` as one parenthesised import per package (ruff's style)."""
    by_package: dict[str, list[str]] = {}
    for statement in statements:
        package, _, module = statement.removeprefix("from ").partition(" import ")
        by_package.setdefault(package, []).append(module)
    lines: list[str] = []
    for package, modules in sorted(by_package.items()):
        lines += [f"from {package} import (", *(f"    {m}," for m in sorted(modules)), ")"]
    return lines


def _imports(contract: Contract, message: Message) -> Iterator[str]:
    """The modules a request's annotations name (its own, and those of its message fields)."""
    yield from _module_import(contract, message.python)
    for field in message.proto.field:
        if field.type != FDP.TYPE_MESSAGE:
            continue
        entry = contract.messages[field.type_name]
        if entry.proto.options.map_entry:
            for inner in entry.proto.field:
                if inner.type == FDP.TYPE_MESSAGE:
                    yield from _module_import(contract, contract.messages[inner.type_name].python)
        elif field.type_name != REQUEST_META:
            yield from _module_import(contract, entry.python)


def _module_import(contract: Contract, python: str) -> Iterator[str]:
    module = python.split(".")[0]
    for statement in contract.modules.values():
        if statement.endswith(f" {module}"):
            yield statement
            return


def write(root: Path) -> Path:
    """Generate aimass/client/generated.py under ``root`` (the repository) from its protos."""
    target = root / OUTPUT
    text = render(descriptor_set(root))
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2], help="the repository")
    parser.add_argument("--check", action="store_true", help="exit 1 when generated.py is not what the protos give")
    args = parser.parse_args(argv)
    if args.check:
        current = (args.root / OUTPUT).read_text() if (args.root / OUTPUT).exists() else ""
        if current != render(descriptor_set(args.root)):
            print(f"{OUTPUT} is stale: run python {Path(__file__).relative_to(args.root)}", file=sys.stderr)
            return 1
        return 0
    print(write(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
