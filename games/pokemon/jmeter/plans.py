"""The two JMeter plans of the paper's stress tests, built from the recorded session.

    python -m games.pokemon.jmeter.plans      # rewrites aggressive.jmx and mixed.jmx

- aggressive: only the data-intensive requests of the session (wild Pokemon, pokedex,
  party), back to back, no pauses.
- mixed: data-intensive and regular requests (location update, profile) in equal
  numbers, each after a think time drawn uniformly around the session's mean.

The plans use plain elements only (TestPlan, ThreadGroup, CSVDataSet, ConfigTestElement,
HeaderManager, HTTPSamplerProxy, UniformRandomTimer), so that they load in Debian's
JMeter 2.13 and in current 5.x alike. Everything that changes between runs is a JMeter
property (`-Jname=value`): host, port (IP literal: JMeter must not look up names),
threads, duration, rampup, users_csv, pause_ms, pause_jitter_ms. Each iteration reads the
next line of users_csv (`uid,token,lat,lng,src`, shared by all threads, recycled; src is
the request's source address, an IP literal or empty), so a plan
with fewer threads than users plays every user in turn: that is how bench.jmeter
multiplexes thousands of virtual users onto a few threads.

Catching (POST /pm) and GET /pm/<id> are left out: a spawn can be caught once per user,
so replaying them in a loop would measure the game's 404/409 answers, not its latency.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from xml.etree import ElementTree as ET

HERE = Path(__file__).resolve().parent
SESSION = HERE.parent / "session.jsonl"

# Request name -> (method, path, JSON body or None). Names are the session's `type`s.
REQUESTS = {
    "wild": ("GET", "/wpm", None),
    "pokedex": ("GET", "/pd", None),
    "party": ("GET", "/6pm", None),
    "update": ("POST", "/update", '{"lat": ${lat}, "lng": ${lng}}'),
    "profile": ("GET", "/u", None),
}
AGGRESSIVE = ("wild", "pokedex", "party")
# Three data-intensive and three regular requests per iteration: equal numbers.
MIXED = ("update", "wild", "profile", "pokedex", "update", "party")
PLANS = {"aggressive": AGGRESSIVE, "mixed": MIXED}


def session_think_ms(session: Path = SESSION) -> int:
    """The mean think time before a request in the recorded session, in ms."""
    lines = [json.loads(x) for x in session.read_text().splitlines() if x.strip()]
    thinks = [x["think_s"] for x in lines if x.get("type") != "summary"]
    return round(statistics.fmean(thinks) * 1000)


def _prop(parent: ET.Element, kind: str, name: str, value: str | None = None) -> ET.Element:
    e = ET.SubElement(parent, kind, name=name)
    if value is not None:
        e.text = value
    return e


def _element(tree: ET.Element, tag: str, gui: str, cls: str, name: str) -> ET.Element:
    e = ET.SubElement(tree, tag, guiclass=gui, testclass=cls, testname=name, enabled="true")
    ET.SubElement(tree, "hashTree")
    return e


def _children(tree: ET.Element) -> ET.Element:
    """The hashTree that holds the children of the element just added to `tree`."""
    return tree[-1]


def build(name: str, think_ms: int) -> ET.ElementTree:
    """The plan `name` ("aggressive" or "mixed") as an XML tree."""
    steps = PLANS[name]
    root = ET.Element("jmeterTestPlan", version="1.2", properties="2.8", jmeter="2.13")
    top = ET.SubElement(root, "hashTree")

    plan = _element(top, "TestPlan", "TestPlanGui", "TestPlan", f"enorm pokemon {name}")
    _prop(plan, "stringProp", "TestPlan.comments",
          "Built by games/pokemon/jmeter/plans.py from games/pokemon/session.jsonl")  # fmt: skip
    _prop(plan, "boolProp", "TestPlan.functional_mode", "false")
    _prop(plan, "boolProp", "TestPlan.serialize_threadgroups", "false")
    args = _prop(plan, "elementProp", "TestPlan.user_defined_variables")
    args.set("elementType", "Arguments")
    args.set("guiclass", "ArgumentsPanel")
    args.set("testclass", "Arguments")
    ET.SubElement(args, "collectionProp", name="Arguments.arguments")
    _prop(plan, "stringProp", "TestPlan.user_define_classpath", "")
    plan_tree = _children(top)

    group = _element(plan_tree, "ThreadGroup", "ThreadGroupGui", "ThreadGroup", "users")
    _prop(group, "stringProp", "ThreadGroup.on_sample_error", "continue")
    loop = _prop(group, "elementProp", "ThreadGroup.main_controller")
    loop.set("elementType", "LoopController")
    loop.set("guiclass", "LoopControlPanel")
    loop.set("testclass", "LoopController")
    loop.set("testname", "loop")
    loop.set("enabled", "true")
    _prop(loop, "boolProp", "LoopController.continue_forever", "false")
    _prop(loop, "intProp", "LoopController.loops", "-1")
    _prop(group, "stringProp", "ThreadGroup.num_threads", "${__P(threads,1)}")
    _prop(group, "stringProp", "ThreadGroup.ramp_time", "${__P(rampup,1)}")
    _prop(group, "longProp", "ThreadGroup.start_time", "0")
    _prop(group, "longProp", "ThreadGroup.end_time", "0")
    _prop(group, "boolProp", "ThreadGroup.scheduler", "true")
    _prop(group, "stringProp", "ThreadGroup.duration", "${__P(duration,300)}")
    _prop(group, "stringProp", "ThreadGroup.delay", "0")
    group_tree = _children(plan_tree)

    csv = _element(group_tree, "CSVDataSet", "TestBeanGUI", "CSVDataSet", "users_csv")
    for key, value in (("filename", "${__P(users_csv,users.csv)}"), ("fileEncoding", "UTF-8"),
                       ("variableNames", "uid,token,lat,lng,src"), ("delimiter", ","),
                       ("quotedData", "false"), ("recycle", "true"), ("stopThread", "false"),
                       ("shareMode", "shareMode.all")):  # fmt: skip
        kind = "boolProp" if value in ("true", "false") else "stringProp"
        _prop(csv, kind, key, value)

    defaults = _element(group_tree, "ConfigTestElement", "HttpDefaultsGui",
                        "ConfigTestElement", "edge server")  # fmt: skip
    dargs = _prop(defaults, "elementProp", "HTTPsampler.Arguments")
    dargs.set("elementType", "Arguments")
    dargs.set("guiclass", "HTTPArgumentsPanel")
    dargs.set("testclass", "Arguments")
    ET.SubElement(dargs, "collectionProp", name="Arguments.arguments")
    for key, value in (("HTTPSampler.domain", "${__P(host,127.0.0.1)}"),
                       ("HTTPSampler.port", "${__P(port,8080)}"),
                       ("HTTPSampler.protocol", "http"),
                       ("HTTPSampler.connect_timeout", "${__P(connect_timeout_ms,5000)}"),
                       ("HTTPSampler.response_timeout",
                        "${__P(response_timeout_ms,10000)}")):  # fmt: skip
        _prop(defaults, "stringProp", key, value)

    headers = _element(group_tree, "HeaderManager", "HeaderPanel", "HeaderManager", "player")
    hcoll = _prop(headers, "collectionProp", "HeaderManager.headers")
    for key, value in (("X-User", "${uid}"), ("X-Token", "${token}"),
                       ("Content-Type", "application/json")):  # fmt: skip
        h = ET.SubElement(hcoll, "elementProp", name=key, elementType="Header")
        _prop(h, "stringProp", "Header.name", key)
        _prop(h, "stringProp", "Header.value", value)

    for step in steps:
        method, path, body = REQUESTS[step]
        sampler = _element(group_tree, "HTTPSamplerProxy", "HttpTestSampleGui",
                           "HTTPSamplerProxy", f"{step} {path}")  # fmt: skip
        sargs = _prop(sampler, "elementProp", "HTTPsampler.Arguments")
        sargs.set("elementType", "Arguments")
        coll = ET.SubElement(sargs, "collectionProp", name="Arguments.arguments")
        if body is not None:
            _prop(sampler, "boolProp", "HTTPSampler.postBodyRaw", "true")
            arg = ET.SubElement(coll, "elementProp", name="", elementType="HTTPArgument")
            _prop(arg, "boolProp", "HTTPArgument.always_encode", "false")
            _prop(arg, "stringProp", "Argument.value", body)
            _prop(arg, "stringProp", "Argument.metadata", "=")
        else:
            sargs.set("guiclass", "HTTPArgumentsPanel")
            sargs.set("testclass", "Arguments")
        for key, value in (("HTTPSampler.path", path), ("HTTPSampler.method", method),
                           ("HTTPSampler.contentEncoding", "UTF-8"),
                           ("HTTPSampler.ipSource", "${src}")):  # fmt: skip
            _prop(sampler, "stringProp", key, value)
        for key, value in (("HTTPSampler.follow_redirects", "false"),
                           ("HTTPSampler.auto_redirects", "false"),
                           ("HTTPSampler.use_keepalive", "true"),
                           ("HTTPSampler.DO_MULTIPART_POST", "false")):  # fmt: skip
            _prop(sampler, "boolProp", key, value)
        if name == "mixed":  # the think time before each request (a timer child)
            timer = _element(_children(group_tree), "UniformRandomTimer", "UniformRandomTimerGui",
                             "UniformRandomTimer", "think")  # fmt: skip
            # delay = pause_ms + uniform(0, pause_jitter_ms): the session's mean on average
            _prop(timer, "stringProp", "ConstantTimer.delay", f"${{__P(pause_ms,{think_ms // 2})}}")
            _prop(timer, "stringProp", "RandomTimer.range", f"${{__P(pause_jitter_ms,{think_ms})}}")
    ET.indent(root, space="  ")
    return ET.ElementTree(root)


def write(out_dir: Path = HERE, session: Path = SESSION) -> list[Path]:
    think = session_think_ms(session)
    paths = []
    for name in PLANS:
        path = out_dir / f"{name}.jmx"
        path.write_text(render(name, think))
        paths.append(path)
    return paths


def render(name: str, think_ms: int) -> str:
    xml = ET.tostring(build(name, think_ms).getroot(), "unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + xml + "\n"


if __name__ == "__main__":
    for p in write():
        print(p)
