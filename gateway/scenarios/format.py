"""A scenario's YAML document, parsed and validated into a ``Scenario`` (the format is described in docs/scenarios.md).

::

    name: read-aloud
    description: Reads the text in a photo aloud.
    inputs:
      image: {type: bytes, description: A photo with printed text}
      voice: {type: text, default: ""}
    steps:
      ocr:
        method: VisionService.ReadText
        request: {images: [{data: "${inputs.image}"}]}
      speak:
        method: SpeechService.Synthesize
        request: {text: "${steps.ocr.results[0].text}", voice: "${inputs.voice}", encoding: AUDIO_ENCODING_WAV}
        timeout: 60s
    outputs:
      text: "${steps.ocr.results[0].text}"
      audio: "${steps.speak.audio.data}"

Everything is checked when the document is loaded, so a run fails only on what a run decides (the inputs' values,
a step's status): the document is YAML (one document, no aliases), its keys are known ones, every method is a
unary or server-streaming method of the model services, every request key is a field of the method's request
(proto or JSON name), literals have the field's type, every reference names a declared input or step and a path
that exists in that step's response, a reference's type fits the field it fills, and the steps form no cycle. A
fault is an ``InvalidArgument`` whose message starts with "line N:" (1-based, the line of the node at fault) and
whose ErrorInfo carries ``line``. The lines come from PyYAML's composed nodes (``start_mark``), which is why the
document is walked as nodes rather than loaded into dicts first.

References are ``${inputs.NAME...}`` or ``${steps.ID...}`` followed by ``.field`` and ``[index]`` parts. A string
that is exactly one reference takes the referenced value as it is (bytes, a number, a message, a list); a single
value given to a repeated field becomes a one-item list. A string with references inside other text is text, the
references formatted into it. What a step reads is what it waits for: that is the DAG the runner follows.

Types are checked with a small vocabulary of kinds: ``text``, ``bytes``, ``number``, ``flag``, ``enum:<name>``,
``message:<full name>``, ``list:<kind>`` and ``any`` (a json input, a map field, an output), which fits everything.
An enum read from a response is its value's name, so it is ``text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from aimass.runtime.errors import InvalidArgument
from aimass.v1 import llm_pb2, nlp_pb2, speech_pb2, vision_pb2  # noqa: F401  (their descriptors, in the pool)

# The model services a step may call; the control plane's and the composite front doors' are not steps.
SERVICES: Final = ("NlpService", "VisionService", "SpeechService", "LlmService")
INPUT_TYPES: Final = {"text": "text", "bytes": "bytes", "number": "number", "flag": "flag", "json": "any"}
NAME: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
IDENT: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")
REFERENCE: Final = re.compile(r"\$\{([^}]*)\}")
REF_BODY: Final = re.compile(r"^(inputs|steps)\.([A-Za-z_][A-Za-z0-9_-]*)((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)$")
REF_PART: Final = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
TIMEOUT: Final = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")
MAX_TIMEOUT_S: Final = 3600.0
TOP_KEYS: Final = ("name", "description", "inputs", "steps", "outputs")
INPUT_KEYS: Final = ("type", "description", "default")
STEP_KEYS: Final = ("method", "request", "timeout")
NUMBER_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
SCALAR_KINDS: Final = frozenset({"text", "number", "flag", "any"})


class ScenarioError(InvalidArgument):
    """A malformed scenario document: the message starts with the line at fault."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}", reason="BAD_SCENARIO", metadata={"line": str(line)})
        self.line = line


@dataclass(frozen=True)
class Ref:
    """``${root.name<path>}``: an input's value or a step's response, and a path into it."""

    text: str
    root: str
    name: str
    path: tuple[str | int, ...]
    # Given to a repeated field: the value becomes a one-item list.
    wrap: bool = False

    @property
    def step(self) -> str | None:
        return self.name if self.root == "steps" else None


@dataclass(frozen=True)
class Interpolated:
    """Text with references formatted into it."""

    parts: tuple[str | Ref, ...]


# A request or output template: YAML's values, with Ref and Interpolated where references are.
Template = Any


@dataclass(frozen=True)
class Input:
    name: str
    type: str
    description: str
    default: Any
    required: bool
    line: int


@dataclass(frozen=True)
class Step:
    id: str
    # "/aimass.v1.VisionService/ReadText", as the forwarder names it.
    method: str
    request_type: type[Message]
    response_type: type[Message]
    streaming: bool
    request: Template
    timeout_s: float | None
    needs: frozenset[str]
    line: int

    @property
    def display(self) -> str:
        """ "aimass.v1.VisionService/ReadText"."""
        return self.method.lstrip("/")


@dataclass(frozen=True)
class Output:
    name: str
    value: Template
    needs: frozenset[str]
    line: int


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    inputs: tuple[Input, ...]
    steps: tuple[Step, ...]
    outputs: tuple[Output, ...]
    source: str = field(repr=False)

    def step(self, step_id: str) -> Step:
        return next(s for s in self.steps if s.id == step_id)


def parse(source: str, *, max_steps: int = 32, max_bytes: int = 65536) -> Scenario:
    """``source`` validated into a Scenario; raises ScenarioError naming the line at fault (see the module)."""
    size = len(source.encode())
    if size > max_bytes:
        raise ScenarioError(1, f"the document is {size} bytes; the limit is {max_bytes}")
    try:
        for event in yaml.parse(source, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ScenarioError(_line(event), "aliases (*name) are not allowed; write the value out")
        root = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ScenarioError(line, f"not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ScenarioError(1, f"not valid YAML: {err}") from None
    if root is None:
        raise ScenarioError(1, "the document is empty; it needs name, steps and outputs")
    return _Parser(source, max_steps).scenario(root)


def _line(node: yaml.Node | yaml.Event) -> int:
    mark = node.start_mark
    return int(mark.line) + 1 if mark is not None else 1


def _kind_of(fd: FieldDescriptor, *, element: bool = False) -> str:
    """The kind of a field's value (of one item, with ``element``)."""
    if fd.is_repeated and not element:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            return "any"
        return "list:" + _kind_of(fd, element=True)
    if fd.message_type is not None:
        return "message:" + fd.message_type.full_name
    if fd.enum_type is not None:
        return "enum:" + fd.enum_type.full_name
    if fd.type == FieldDescriptor.TYPE_STRING:
        return "text"
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return "bytes"
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return "flag"
    return "number"


def field_named(message: Descriptor, name: str) -> FieldDescriptor | None:
    """The field ``name`` (its proto or JSON name) of ``message``."""
    found = message.fields_by_name.get(name)
    if found is None:
        found = next((f for f in message.fields if f.json_name == name), None)
    return found


def _fits(have: str, want: str) -> bool:
    """Whether a value of kind ``have`` may fill a place of kind ``want``."""
    if have == want or "any" in (have, want):
        return True
    if want.startswith("enum:"):
        return have in ("text", "number")
    if want.startswith("list:") and have.startswith("list:"):
        return _fits(have[5:], want[5:])
    return False


def _message_descriptor(kind: str) -> Descriptor:
    return descriptor_pool.Default().FindMessageTypeByName(kind.removeprefix("message:"))


def resolve_method(name: str) -> MethodDescriptor | None:
    """ "VisionService.ReadText", "aimass.v1.VisionService.ReadText" or "/aimass.v1.VisionService/ReadText"."""
    cleaned = name.strip().lstrip("/").replace("/", ".").removeprefix("aimass.v1.")
    service, _, method = cleaned.partition(".")
    if service not in SERVICES or not method:
        return None
    descriptor = descriptor_pool.Default().FindServiceByName(f"aimass.v1.{service}")
    return descriptor.methods_by_name.get(method)


class _Parser:
    def __init__(self, source: str, max_steps: int) -> None:
        self.source = source
        self.max_steps = max_steps
        self.constructor = yaml.SafeLoader("")
        self.inputs: dict[str, Input] = {}
        # Step id -> (its response's kind, its line), declared before any request is read so order is free.
        self.step_kinds: dict[str, tuple[str, int]] = {}

    def scalar(self, node: yaml.Node) -> Any:
        return self.constructor.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None = None) -> dict[str, yaml.Node]:
        """A mapping node's values by key (keys are text, once each, and among ``allowed`` when given)."""
        return {key: value for key, (_, value) in self.entries(node, what, allowed).items()}

    def entries(
        self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping node's (key node, value node) by key, checked as ``mapping`` says."""
        if not isinstance(node, yaml.MappingNode):
            raise ScenarioError(_line(node), f"{what} must be a mapping")
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise ScenarioError(_line(key_node), f"{what}: keys must be text")
            if key in entries:
                raise ScenarioError(_line(key_node), f"{what}: {key!r} is given twice")
            if allowed is not None and key not in allowed:
                raise ScenarioError(_line(key_node), f"{what}: unknown key {key!r}; allowed: {', '.join(allowed)}")
            entries[key] = (key_node, value_node)
        return entries

    def text(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str):
            raise ScenarioError(_line(node), f"{what} must be text")
        return value

    def scenario(self, root: yaml.Node) -> Scenario:
        top_entries = self.entries(root, "the document", TOP_KEYS)
        top = {key: value for key, (_, value) in top_entries.items()}
        for required in ("name", "steps"):
            if required not in top:
                raise ScenarioError(_line(root), f"the document has no {required!r}")
        name = self.text(top["name"], "name")
        if not NAME.match(name):
            raise ScenarioError(
                _line(top["name"]), f"name {name!r}: 1..63 lowercase letters, digits and '-', starting with one"
            )
        description = self.text(top["description"], "description") if "description" in top else ""
        if "inputs" in top:
            for input_name, node in self.mapping(top["inputs"], "inputs").items():
                self.inputs[input_name] = self.input(input_name, node)
        step_entries = self.entries(top["steps"], "steps")
        step_nodes = {key: value for key, (_, value) in step_entries.items()}
        step_keys = {key: key_node for key, (key_node, _) in step_entries.items()}
        steps_line = _line(top_entries["steps"][0])
        if not step_nodes:
            raise ScenarioError(steps_line, "steps: at least one step")
        if len(step_nodes) > self.max_steps:
            raise ScenarioError(steps_line, f"{len(step_nodes)} steps; the limit is {self.max_steps}")
        methods: dict[str, MethodDescriptor] = {}
        for step_id, node in step_nodes.items():
            if not IDENT.match(step_id):
                raise ScenarioError(_line(step_keys[step_id]), f"step id {step_id!r}: letters, digits, '_' and '-'")
            entries = self.mapping(node, f"step {step_id!r}", STEP_KEYS)
            if "method" not in entries:
                raise ScenarioError(_line(node), f"step {step_id!r} has no 'method'")
            method_name = self.text(entries["method"], f"step {step_id!r}: method")
            method = resolve_method(method_name)
            if method is None:
                raise ScenarioError(
                    _line(entries["method"]),
                    f"step {step_id!r}: unknown method {method_name!r}; a step calls a method of "
                    f"{', '.join(SERVICES)}, e.g. VisionService.ReadText",
                )
            if method.client_streaming:
                raise ScenarioError(
                    _line(entries["method"]),
                    f"step {step_id!r}: {method.full_name} takes a stream; it cannot be a step",
                )
            methods[step_id] = method
            self.step_kinds[step_id] = ("message:" + method.output_type.full_name, _line(step_keys[step_id]))
        steps = tuple(
            self.step(step_id, node, methods[step_id], _line(step_keys[step_id]))
            for step_id, node in step_nodes.items()
        )
        self.check_acyclic(steps)
        outputs: list[Output] = []
        if "outputs" in top:
            for output_name, (key_node, node) in self.entries(top["outputs"], "outputs").items():
                if not IDENT.match(output_name):
                    raise ScenarioError(_line(key_node), f"output name {output_name!r}: letters, digits, '_' and '-'")
                value = self.template(node, "any", f"output {output_name!r}")
                outputs.append(Output(output_name, value, _needs(value), _line(key_node)))
        return Scenario(name, description, tuple(self.inputs.values()), steps, tuple(outputs), self.source)

    def input(self, name: str, node: yaml.Node) -> Input:
        if not IDENT.match(name):
            raise ScenarioError(_line(node), f"input name {name!r}: letters, digits, '_' and '-'")
        entries = self.mapping(node, f"input {name!r}", INPUT_KEYS)
        if "type" not in entries:
            raise ScenarioError(_line(node), f"input {name!r} has no 'type' ({', '.join(INPUT_TYPES)})")
        type_ = self.text(entries["type"], f"input {name!r}: type")
        if type_ not in INPUT_TYPES:
            raise ScenarioError(
                _line(entries["type"]), f"input {name!r}: type {type_!r}; one of {', '.join(INPUT_TYPES)}"
            )
        description = (
            self.text(entries["description"], f"input {name!r}: description") if "description" in entries else ""
        )
        default = None
        if "default" in entries:
            default = self.scalar(entries["default"])
            if type_ == "bytes" or not _literal_fits(default, INPUT_TYPES[type_]):
                raise ScenarioError(_line(entries["default"]), f"input {name!r}: the default is not of type {type_}")
        return Input(name, type_, description, default, "default" not in entries, _line(node))

    def step(self, step_id: str, node: yaml.Node, method: MethodDescriptor, line: int) -> Step:
        entries = self.mapping(node, f"step {step_id!r}", STEP_KEYS)
        what = f"step {step_id!r}"
        request: Template = {}
        if "request" in entries and entries["request"].tag != "tag:yaml.org,2002:null":
            if isinstance(entries["request"], yaml.MappingNode):
                for key, (key_node, _) in self.entries(entries["request"], f"{what}: request").items():
                    if key == "meta":
                        raise ScenarioError(
                            _line(key_node),
                            f"{what}: request.meta is the caller's (priority, request id); leave it out",
                        )
            request = self.template(entries["request"], "message:" + method.input_type.full_name, f"{what}: request")
        timeout_s = self.timeout(entries["timeout"], what) if "timeout" in entries else None
        return Step(
            id=step_id,
            method=f"/{method.containing_service.full_name}/{method.name}",
            request_type=GetMessageClass(method.input_type),
            response_type=GetMessageClass(method.output_type),
            streaming=bool(method.server_streaming),
            request=request,
            timeout_s=timeout_s,
            needs=_needs(request),
            line=line,
        )

    def timeout(self, node: yaml.Node, what: str) -> float:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (match := TIMEOUT.match(value.strip())):
            seconds = float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match[2]]
        if seconds is None or not 0 < seconds <= MAX_TIMEOUT_S:
            raise ScenarioError(
                _line(node), f"{what}: timeout {value!r}; seconds (30, '30s', '500ms') up to {MAX_TIMEOUT_S:g}"
            )
        return seconds

    def template(self, node: yaml.Node, kind: str, what: str) -> Template:
        """``node`` as a template for a place of ``kind`` (see the module)."""
        if isinstance(node, yaml.MappingNode):
            if kind == "any":
                return {
                    key: self.template(value, "any", f"{what}.{key}") for key, value in self.mapping(node, what).items()
                }
            if not kind.startswith("message:"):
                raise ScenarioError(_line(node), f"{what} is {_describe(kind)}, not a mapping")
            message = _message_descriptor(kind)
            built: dict[str, Template] = {}
            for key, (key_node, value) in self.entries(node, what).items():
                fd = field_named(message, key)
                if fd is None:
                    known = ", ".join(f.name for f in message.fields)
                    raise ScenarioError(
                        _line(key_node), f"{what}: {message.name} has no field {key!r} (it has {known})"
                    )
                built[fd.name] = self.template(value, _kind_of(fd), f"{what}.{fd.name}")
            return built
        if isinstance(node, yaml.SequenceNode):
            if kind != "any" and not kind.startswith("list:"):
                raise ScenarioError(_line(node), f"{what} is {_describe(kind)}, not a list")
            item = "any" if kind == "any" else kind[5:]
            return [self.template(value, item, f"{what}[{i}]") for i, value in enumerate(node.value)]
        value = self.scalar(node)
        if isinstance(value, str) and "${" in value:
            return self.references(value, kind, what, _line(node))
        place = kind[5:] if kind.startswith("list:") else kind
        if not _literal_fits(value, place):
            raise ScenarioError(_line(node), f"{what} is {_describe(place)}; {value!r} is not")
        if place.startswith("enum:") and isinstance(value, str):
            names = descriptor_pool.Default().FindEnumTypeByName(place[5:]).values_by_name
            if value not in names:
                raise ScenarioError(_line(node), f"{what}: {value!r} is not one of {', '.join(names)}")
        return [value] if place != kind else value

    def references(self, text: str, kind: str, what: str, line: int) -> Ref | Interpolated:
        parts: list[str | Ref] = []
        at = 0
        for match in REFERENCE.finditer(text):
            if match.start() > at:
                parts.append(text[at : match.start()])
            parts.append(self.reference(match, line, what))
            at = match.end()
        if at < len(text):
            parts.append(text[at:])
        if "${" in "".join(p for p in parts if isinstance(p, str)):
            raise ScenarioError(
                line, f"{what}: an unclosed reference in {text!r}; write ${{inputs.x}} or ${{steps.id.field}}"
            )
        if len(parts) == 1 and isinstance(parts[0], Ref):
            ref = parts[0]
            have = self.kind_of(ref, line, what)
            if _fits(have, kind):
                return ref
            if kind.startswith("list:") and _fits(have, kind[5:]):
                return Ref(ref.text, ref.root, ref.name, ref.path, wrap=True)
            raise ScenarioError(line, f"{what} is {_describe(kind)}; {ref.text} is {_describe(have)}")
        if kind not in ("text", "any", "list:text") and not kind.startswith("enum:"):
            raise ScenarioError(line, f"{what} is {_describe(kind)}; text with references in it is text")
        for part in parts:
            if isinstance(part, Ref) and (have := self.kind_of(part, line, what)) not in SCALAR_KINDS:
                raise ScenarioError(line, f"{what}: {part.text} is {_describe(have)}, which cannot be part of text")
        interpolated = Interpolated(tuple(parts))
        return interpolated if kind != "list:text" else [interpolated]  # type: ignore[return-value]

    def reference(self, match: re.Match[str], line: int, what: str) -> Ref:
        body = REF_BODY.match(match[1].strip())
        if body is None:
            raise ScenarioError(
                line, f"{what}: {match[0]} is not a reference; write ${{inputs.x}} or ${{steps.id.field[0]}}"
            )
        path = tuple(int(m[2]) if m[2] is not None else m[1] for m in REF_PART.finditer(body[3]))
        return Ref(match[0], body[1], body[2], path)

    def kind_of(self, ref: Ref, line: int, what: str) -> str:
        """The kind of the value ``ref`` reads (checking that it names an input or step, and a path that exists)."""
        if ref.root == "inputs":
            if ref.name not in self.inputs:
                raise ScenarioError(
                    line, f"{what}: {ref.text}: no input {ref.name!r} (inputs: {', '.join(self.inputs) or 'none'})"
                )
            kind = INPUT_TYPES[self.inputs[ref.name].type]
        else:
            if ref.name not in self.step_kinds:
                raise ScenarioError(
                    line, f"{what}: {ref.text}: no step {ref.name!r} (steps: {', '.join(self.step_kinds)})"
                )
            kind = self.step_kinds[ref.name][0]
        for part in ref.path:
            if kind == "any":
                return "any"
            if isinstance(part, int):
                if not kind.startswith("list:"):
                    raise ScenarioError(line, f"{what}: {ref.text}: [{part}] of {_describe(kind)}, not a list")
                kind = kind[5:]
                continue
            if not kind.startswith("message:"):
                raise ScenarioError(line, f"{what}: {ref.text}: .{part} of {_describe(kind)}, not a message")
            message = _message_descriptor(kind)
            fd = field_named(message, part)
            if fd is None:
                known = ", ".join(f.name for f in message.fields)
                raise ScenarioError(line, f"{what}: {ref.text}: {message.name} has no field {part!r} (it has {known})")
            kind = _kind_of(fd)
        # An enum read from a response is its value's name.
        return "text" if kind.startswith("enum:") else kind

    def check_acyclic(self, steps: tuple[Step, ...]) -> None:
        needs = {step.id: step.needs for step in steps}
        state: dict[str, int] = {}  # 1: being visited, 2: done

        def visit(step_id: str, trail: list[str]) -> None:
            if state.get(step_id) == 2:
                return
            if state.get(step_id) == 1:
                cycle = [*trail[trail.index(step_id) :], step_id]
                raise ScenarioError(self.step_kinds[step_id][1], f"steps {' -> '.join(cycle)} form a cycle")
            state[step_id] = 1
            for need in sorted(needs[step_id]):
                visit(need, [*trail, step_id])
            state[step_id] = 2

        for step in steps:
            visit(step.id, [])


def _literal_fits(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "text":
        return isinstance(value, str)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "flag":
        return isinstance(value, bool)
    if kind.startswith("enum:"):
        return isinstance(value, str | int) and not isinstance(value, bool)
    return False


def _describe(kind: str) -> str:
    if kind.startswith("list:"):
        item = _describe(kind[5:]).removeprefix("a ").removeprefix("an ")
        return f"a list of {item}s" if item.endswith("message") else f"a list of {item}"
    if kind.startswith("message:"):
        return f"a {kind.rsplit('.', 1)[-1]} message"
    if kind.startswith("enum:"):
        return f"an enum {kind.rsplit('.', 1)[-1]}"
    return {"text": "text", "bytes": "bytes", "number": "a number", "flag": "a flag (true/false)", "any": "any value"}[
        kind
    ]


def _needs(template: Template) -> frozenset[str]:
    """The steps a template reads."""
    if isinstance(template, Ref):
        return frozenset({template.name}) if template.step else frozenset()
    if isinstance(template, Interpolated):
        return frozenset(p.name for p in template.parts if isinstance(p, Ref) and p.step)
    if isinstance(template, dict):
        return frozenset().union(*(_needs(v) for v in template.values()))
    if isinstance(template, list):
        return frozenset().union(*(_needs(v) for v in template))
    return frozenset()
