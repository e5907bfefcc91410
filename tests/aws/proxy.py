#!/usr/bin/env python3
"""An HTTP/1.1 reverse proxy in front of moto, for Bakery's tests.

moto stands in for AWS but fakes parts of what Bakery relies on. Every request goes to moto
unchanged except where this proxy has to step in:

* EBS direct APIs: moto checks no checksum, length or count and reports a 512-byte block size.
  The proxy validates PutSnapshotBlock and CompleteSnapshot as AWS does (rejecting with
  ValidationException before moto sees the request, and keeping a list of violations; the LINEAR
  aggregate checksum is required), and presents BlockSize 524288. A StartSnapshot ClientToken
  seen before answers with the snapshot it started, as EBS does.
* Parent snapshots: moto ignores StartSnapshot's ParentSnapshotId. The proxy requires it to exist
  and be completed, records it, and answers ListSnapshotBlocks, ListChangedBlocks and
  GetSnapshotBlock of a child through its ancestors.
* Query APIs (EC2, Auto Scaling, ELBv2, CloudWatch) and JSON APIs (Cloud Map, CloudWatch as boto3
  speaks it): every request is recorded, so tests can check what was asked for even where moto
  drops parameters (RegisterImage keeps only a name and description).
* RegisterImage is checked as EC2 checks it (architecture, the root device mapped to a snapshot
  that exists and is completed, ENA, boot mode, IMDS support, a name unique in the account), and
  launch template names as EC2 allows them.
* Cloud Map: moto's RegisterInstance appends a second entry for an instance id it already has;
  AWS updates the one entry. The proxy deregisters the old entry first.
* AMI deregistration protection and deprecation: moto has neither. The proxy keeps both,
  refuses DeregisterImage of a protected image, and shows them in DescribeImages.
* Auto Scaling: moto answers PutScalingPolicy without the policy's ARN, and keeps a deleted
  group's scaling policies and scheduled actions; the proxy adds the ARN and deletes them.
* CloudWatch: moto computes no percentile statistics. The proxy answers GetMetricData's `pNN`
  queries from the PutMetricData requests it recorded.
* Faults: throttling, server errors, dropped connections, lost replies (the request takes effect,
  then the connection drops), corrupted blocks and unhealthy targets, in the error formats the
  AWS SDKs parse.

The control API lives under /_proxy/ (see `Control`). Stdlib only.
"""

import argparse
import base64
from datetime import datetime
import hashlib
import http.client
import http.server
import json
import random
import re
import socket
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from urllib.parse import parse_qsl, urlencode, urlsplit

# EBS direct APIs work on 512 KiB blocks (AWS EBS direct API reference, PutSnapshotBlock).
BLOCK_SIZE = 512 * 1024
BLOCKS_PER_GIB = (1 << 30) // BLOCK_SIZE
# Large enough for several whole blocks in flight per connection (net.core.*mem_max here is 4 MiB).
SOCKET_BUFFER = 4 * 1024 * 1024
# ListSnapshotBlocks / ListChangedBlocks MaxResults range, from the API model.
MAX_RESULTS_RANGE = (100, 10000)

# Headers that describe one hop's connection, never forwarded as such. Content-Length is
# recomputed for every forwarded or rewritten body; Expect is answered here (http.server
# sends the 100 Continue itself).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "content-length",
    }
)

EBS_ROUTES = [
    ("POST", re.compile(r"/snapshots"), "StartSnapshot"),
    ("POST", re.compile(r"/snapshots/completion/(?P<snapshot>[^/]+)"), "CompleteSnapshot"),
    ("PUT", re.compile(r"/snapshots/(?P<snapshot>[^/]+)/blocks/(?P<index>\d+)"), "PutSnapshotBlock"),
    ("GET", re.compile(r"/snapshots/(?P<snapshot>[^/]+)/blocks/(?P<index>\d+)"), "GetSnapshotBlock"),
    ("GET", re.compile(r"/snapshots/(?P<snapshot>[^/]+)/blocks"), "ListSnapshotBlocks"),
    ("GET", re.compile(r"/snapshots/(?P<snapshot>[^/]+)/changedblocks"), "ListChangedBlocks"),
]

# The SigV4 credential scope names the service: Credential=AKID/DATE/REGION/SERVICE/aws4_request.
CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]*/[^/]*/[^/]*/([^/]+)/aws4_request")
# Query API versions, for a request that carries no Authorization header.
QUERY_VERSIONS = {
    "2016-11-15": "ec2",
    "2011-01-01": "autoscaling",
    "2015-12-01": "elasticloadbalancing",
    "2010-08-01": "monitoring",
}
# JSON APIs: the X-Amz-Target prefix names the service.
JSON_TARGETS = {
    "Route53AutoNaming_v20170314": "servicediscovery",
    "GraniteServiceVersion20100801": "monitoring",
    "AmazonSSM": "ssm",
    "DynamoDB_20120810": "dynamodb",
}
CLOUDWATCH_NAMESPACE = "http://monitoring.amazonaws.com/doc/2010-08-01/"
PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")

ELBV2_NAMESPACE = "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/"
ET.register_namespace("", ELBV2_NAMESPACE)
# TargetHealth Reason and Description that ELBv2 reports with each state (ELBv2 API reference,
# TargetHealth). "unused" is left out: it means "not registered", which moto already reports.
HEALTH_REASONS = {
    "healthy": None,
    "initial": ("Elb.RegistrationInProgress", "Target registration is in progress"),
    "unhealthy": ("Target.FailedHealthChecks", "Health checks failed"),
    "draining": ("Target.DeregistrationInProgress", "Target deregistration is in progress"),
    "unavailable": ("Target.HealthCheckDisabled", "Health checks are disabled"),
}

# What the proxy keeps about an image where moto keeps nothing.
IMAGE_FLAGS = ("EnableImageDeregistrationProtection", "DisableImageDeregistrationProtection",
               "EnableImageDeprecation", "DisableImageDeprecation")

# `lost`: the request is forwarded and takes effect, then the connection drops before the reply.
FAULT_KINDS = ("drop", "lost", "throttle", "server_error")


class Request:
    """One client request, with what the proxy could tell about it."""

    def __init__(self, method, target, headers, body):
        self.method = method
        self.target = target  # path and query, as sent to moto
        self.headers = headers  # list of (name, value), hop-by-hop headers removed
        self.body = body
        url = urlsplit(target)
        self.path = url.path
        self.query = dict(parse_qsl(url.query, keep_blank_values=True))
        self.service = None
        self.protocol = None  # "ebs", "query" or "json"
        self.action = None  # EBS API name, query Action or JSON target operation
        self.params = {}  # query API parameters, or a JSON API's request body
        self.ebs = {}  # EBS path parameters: snapshot, index

    def header(self, name):
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)

    def derive(self, target):
        """The same caller (account, region, credentials) asking moto for another GET."""
        return Request("GET", target, self.headers, b"")

    def classify(self):
        if self.path.startswith("/moto-api/"):
            return
        scope = CREDENTIAL_SCOPE.search(self.header("Authorization") or "")
        scoped_service = scope.group(1) if scope else None
        if scoped_service in (None, "ebs"):
            for method, pattern, action in EBS_ROUTES:
                match = pattern.fullmatch(self.path)
                if match and method == self.method:
                    self.service, self.action, self.ebs = "ebs", action, match.groupdict()
                    self.protocol = "ebs"
                    return
        target = self.header("X-Amz-Target")
        if target and "." in target:
            prefix, action = target.split(".", 1)
            try:
                params = json.loads(self.body or b"{}")
            except ValueError:
                params = {}
            self.params = params if isinstance(params, dict) else {}
            self.action, self.protocol = action, "json"
            self.service = scoped_service or JSON_TARGETS.get(prefix, "unknown")
            return
        params = dict(self.query)
        if (self.header("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
            params.update(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))
        if "Action" in params:
            self.params = params
            self.protocol = "query"
            self.action = params["Action"]
            self.service = scoped_service or QUERY_VERSIONS.get(params.get("Version"), "unknown")


class Response:
    def __init__(self, status, headers, body, reason=None):
        self.status = status
        self.headers = headers  # list of (name, value)
        self.body = body
        self.reason = reason

    def with_json(self, value):
        return Response(self.status, self.headers, json.dumps(value).encode(), self.reason)


# Returned by a handler to close the connection without answering.
DROP = object()


def json_response(status, value):
    return Response(status, [("Content-Type", "application/json")], json.dumps(value).encode())


def ebs_error(status, code, message, reason=None):
    """A restJson1 error as EBS sends it: the type in x-amzn-ErrorType, Message/Reason in the body."""
    body = {"Message": message}
    if reason:
        body["Reason"] = reason
    headers = [("Content-Type", "application/json"), ("x-amzn-ErrorType", code)]
    return Response(status, headers, json.dumps(body).encode())


def json_error(status, code, message):
    """An awsJson error: the type in `__type` and x-amzn-ErrorType."""
    headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-ErrorType", code)]
    return Response(status, headers, json.dumps({"__type": code, "message": message}).encode())


# EC2 takes launch template names of 3 to 128 of these; moto takes any.
LAUNCH_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9().\-/_]{3,128}")


def query_error(service, status, code, message):
    """An XML error: EC2's <Response><Errors><Error> or the awsQuery <ErrorResponse><Error>."""
    if service == "ec2":
        xml = (
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            "<RequestID>bakery-proxy</RequestID></Response>"
        )
    else:
        sender = "Receiver" if status >= 500 else "Sender"
        xml = (
            f"<ErrorResponse><Error><Type>{sender}</Type><Code>{code}</Code><Message>{message}</Message>"
            "</Error><RequestId>bakery-proxy</RequestId></ErrorResponse>"
        )
    return Response(status, [("Content-Type", "text/xml")], xml.encode())


def fault_response(request, kind):
    """The injected error, as the real service answers (status and code from the API models and
    botocore's retry table; the Rust SDK classifies all of these codes as retryable)."""
    if kind == "drop":
        return DROP
    if request.service == "ebs":
        if kind == "throttle":
            # EBS models its throttling error as RequestThrottledException, HTTP 400.
            return ebs_error(400, "RequestThrottledException", "Rate exceeded (injected)", "ACCOUNT_THROTTLED")
        return ebs_error(500, "InternalServerException", "Internal error (injected)")
    if request.protocol == "json":
        if kind == "throttle":
            return json_error(400, "ThrottlingException", "Rate exceeded (injected)")
        return json_error(500, "InternalFailure", "Internal failure (injected)")
    if request.service == "ec2":
        if kind == "throttle":
            return query_error("ec2", 503, "RequestLimitExceeded", "Request limit exceeded. (injected)")
        return query_error("ec2", 500, "InternalError", "An internal error has occurred (injected)")
    if kind == "throttle":
        return query_error(request.service, 400, "Throttling", "Rate exceeded (injected)")
    return query_error(request.service, 500, "InternalFailure", "Internal failure (injected)")


def metric_of(params, prefix):
    """(namespace, name, dimensions) and period of a query-protocol MetricStat."""
    dimensions = set()
    index = 1
    while f"{prefix}.Metric.Dimensions.member.{index}.Name" in params:
        dimension = f"{prefix}.Metric.Dimensions.member.{index}"
        dimensions.add((params[f"{dimension}.Name"], params.get(f"{dimension}.Value", "")))
        index += 1
    metric = (params.get(f"{prefix}.Metric.Namespace"), params.get(f"{prefix}.Metric.MetricName"), frozenset(dimensions))
    return metric, float(params.get(f"{prefix}.Period", "60"))


def parse_time(text):
    """Epoch seconds of a JSON number or an ISO 8601 time (as moto and boto3 write them)."""
    if isinstance(text, (int, float)):
        return float(text)
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def metric_values(recorded, metric, start, end):
    """The (value, count) samples of `metric` that JSON PutMetricData requests put in [start, end)."""
    namespace, name, dimensions = metric
    found = []
    for entry in recorded:
        if entry["params"].get("Namespace") != namespace:
            continue
        for datum in entry["params"].get("MetricData", []):
            datum_dimensions = frozenset((d["Name"], d["Value"]) for d in datum.get("Dimensions", []))
            if datum.get("MetricName") != name or datum_dimensions != dimensions:
                continue
            stamp = parse_time(datum.get("Timestamp", entry["time"]))
            if not start <= stamp < end:
                continue
            if "Value" in datum:
                found.append((datum["Value"], 1))
            values = datum.get("Values", [])
            found.extend(zip(values, datum.get("Counts", [1] * len(values))))
    return found


def percentile(samples, rank):
    """Nearest-rank percentile of weighted samples (0 when there are none)."""
    total = sum(count for _, count in samples)
    if total == 0:
        return 0.0
    wanted = max(1, -(-total * rank // 100))
    seen = 0
    for value, count in sorted(samples):
        seen += count
        if seen >= wanted:
            return float(value)
    return float(sorted(samples)[-1][0])


def flip_byte(data):
    """A copy of data with its middle byte's lowest bit flipped: the subtlest corruption."""
    if not data:
        return data
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 1
    return bytes(flipped)


def b64(digest):
    return base64.b64encode(digest).decode()


def load_object(body, allowed):
    """The JSON object in a control request; unknown keys are refused (they are typos)."""
    try:
        value = json.loads(body or b"{}")
    except ValueError as error:
        raise ValueError(f"body is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(value) - set(allowed)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    return value


def number(config, key, default, low, high=None):
    value = config.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (high is not None and value > high):
        raise ValueError(f"{key} must be a number in [{low}, {high if high is not None else 'inf'}]")
    return value


def string_list(config, key):
    value = config.get(key)
    if value is not None and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise ValueError(f"{key} must be a list of strings")
    return value


class FaultPlan:
    """Which requests fail and how: one draw per eligible request from a seeded generator."""

    def __init__(self, config):
        self.rates = {kind: number(config, kind, 0, 0, 1) for kind in FAULT_KINDS}
        if sum(self.rates.values()) > 1:
            raise ValueError("the fault rates add up to more than 1")
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError("seed must be an integer")
        actions = string_list(config, "actions")
        self.actions = None if actions is None else frozenset(actions)
        limit = number(config, "max", None, 0)
        self.remaining = None if limit is None else int(limit)
        each = number(config, "per_action", None, 0)
        self.per_action = None if each is None else int(each)
        self.drawn = Counter()  # faults given to each action
        self.rng = random.Random(seed)
        self.config = {**self.rates, "seed": seed, "actions": actions, "max": self.remaining,
                       "per_action": self.per_action}

    def draw(self, action):
        """The fault for this request, or None. Called under the state lock."""
        if self.remaining == 0 or (self.actions is not None and action not in self.actions):
            return None
        if self.per_action is not None and self.drawn[action] >= self.per_action:
            return None
        roll = self.rng.random()
        for kind in FAULT_KINDS:
            if roll < self.rates[kind]:
                if self.remaining is not None:
                    self.remaining -= 1
                self.drawn[action] += 1
                return kind
            roll -= self.rates[kind]
        return None


class SnapshotRecord:
    def __init__(self, parent, volume_size):
        self.parent = parent
        self.volume_size = volume_size  # GiB
        self.blocks = {}  # block index -> raw SHA-256 digest of the block last put there
        self.completed = False
        self.changed_blocks_count = None

    def to_json(self):
        return {
            "parent": self.parent,
            "blocks": {str(index): digest.hex() for index, digest in sorted(self.blocks.items())},
            "completed": self.completed,
            "changed_blocks_count": self.changed_blocks_count,
        }


class State:
    """Everything the proxy remembers; every field is guarded by `lock`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.clear()

    def clear(self):
        self.requests = Counter()
        self.recorded = []
        self.put_blocks = 0
        self.put_bytes = 0
        self.violations = []
        self.faults = Counter()
        self.snapshots = {}
        self.fault_plan = FaultPlan({})
        self.corrupt_puts = 0
        self.corrupt_gets = 0
        self.health_overrides = []
        self.registered = {}
        self.client_tokens = {}  # StartSnapshot ClientToken -> the answer it got
        self.protected = set()  # image ids with deregistration protection
        self.deprecations = {}  # image id -> DeprecationTime

    def violation(self, message):
        print(f"proxy: violation: {message}", file=sys.stderr, flush=True)
        with self.lock:
            self.violations.append(message)

    def lineage(self, snapshot_id):
        """The snapshot, then each ancestor the proxy saw started, nearest first. Hold the lock."""
        chain = []
        while snapshot_id in self.snapshots and snapshot_id not in chain:
            chain.append(snapshot_id)
            snapshot_id = self.snapshots[snapshot_id].parent
        return chain

    def take(self, counter, fault):
        """Consume one pending corruption from `counter`; True if this request gets it."""
        with self.lock:
            if getattr(self, counter) == 0:
                return False
            setattr(self, counter, getattr(self, counter) - 1)
            self.faults[fault] += 1
            return True


class MotoConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()  # sets TCP_NODELAY
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


class Proxy:
    """The forwarding and the EBS emulation, shared by all handler threads."""

    def __init__(self, moto_host, moto_port):
        self.moto = (moto_host, moto_port)
        self.state = State()
        # One connection per handler thread. moto's server (werkzeug) closes every connection after
        # one response, so http.client reconnects for each request; the object is still reused.
        self.local = threading.local()

    def connection(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = MotoConnection(*self.moto, timeout=300)
        return conn

    def forward(self, request):
        conn = self.connection()
        try:
            has_host = request.header("Host") is not None
            conn.putrequest(request.method, request.target, skip_host=has_host, skip_accept_encoding=True)
            for name, value in request.headers:
                conn.putheader(name, value)
            if request.body or request.method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(request.body)))
            conn.endheaders()
            if request.body:
                conn.send(request.body)  # no copy: endheaders(body) would join headers and body
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            conn.close()
            return Response(502, [("Content-Type", "text/plain")], f"proxy: moto failed: {error!r}\n".encode())
        return Response(response.status, response.getheaders(), body, response.reason)

    def serve(self, request):
        request.classify()
        state = self.state
        fault = None
        if request.action:
            with state.lock:
                state.requests[request.action] += 1
                fault = state.fault_plan.draw(request.action)
                if fault:
                    state.faults[fault] += 1
                if request.service != "ebs":
                    state.recorded.append(
                        {
                            "action": request.action,
                            "service": request.service,
                            "params": request.params,
                            "account": request.header("x-moto-account-id"),
                            "fault": fault,
                            "time": time.time(),
                        }
                    )
            if fault and fault != "lost":
                return fault_response(request, fault)
        response = self.dispatch(request)
        return DROP if fault == "lost" else response

    def dispatch(self, request):
        if request.service == "ebs":
            handlers = {
                "StartSnapshot": self.start_snapshot,
                "PutSnapshotBlock": self.put_snapshot_block,
                "CompleteSnapshot": self.complete_snapshot,
                "ListSnapshotBlocks": self.list_snapshot_blocks,
                "ListChangedBlocks": self.list_changed_blocks,
                "GetSnapshotBlock": self.get_snapshot_block,
            }
            return handlers[request.action](request)
        if request.action == "DescribeTargetHealth":
            return self.describe_target_health(request)
        if request.action == "RegisterImage":
            return self.register_image(request)
        if request.service == "ec2" and request.action in IMAGE_FLAGS:
            return self.image_flag(request)
        if request.service == "ec2" and request.action == "DeregisterImage":
            image_id = request.params.get("ImageId")
            with self.state.lock:
                protected = image_id in self.state.protected
            if protected:
                return query_error("ec2", 400, "OperationNotPermitted",
                                   f"Image {image_id} has deregistration protection enabled")
            response = self.forward(request)
            if response.status == 200:
                with self.state.lock:
                    self.state.registered.pop(request.params.get("ImageId"), None)
            return response
        if request.service == "ec2" and request.action == "CreateLaunchTemplate":
            name = request.params.get("LaunchTemplateName", "")
            if not LAUNCH_TEMPLATE_NAME.fullmatch(name):
                return query_error("ec2", 400, "InvalidLaunchTemplateName.MalformedException",
                                   f"The launch template name {name!r} is not valid")
        if request.action == "DescribeImages":
            return self.describe_images(request)
        if request.service == "servicediscovery" and request.action == "RegisterInstance":
            return self.register_instance(request)
        if request.service == "monitoring" and request.action == "GetMetricData":
            return self.get_metric_data(request)
        if request.service == "autoscaling" and request.action == "PutScalingPolicy":
            return self.put_scaling_policy(request)
        if request.service == "autoscaling" and request.action == "DeleteAutoScalingGroup":
            return self.delete_auto_scaling_group(request)
        return self.forward(request)

    def put_scaling_policy(self, request):
        """AWS answers PutScalingPolicy with the policy's `PolicyARN`; moto's answer leaves it out
        (it sets `PolicyArn`, which its serializer drops). Read back and answered as AWS does."""
        response = self.forward(request)
        if response.status != 200 or request.protocol != "query" or b"<PolicyARN>" in response.body:
            return response
        query = urlencode({
            "Action": "DescribePolicies",
            "Version": request.params.get("Version", "2011-01-01"),
            "AutoScalingGroupName": request.params.get("AutoScalingGroupName", ""),
            "PolicyNames.member.1": request.params.get("PolicyName", ""),
        })
        described = self.forward(request.derive(f"/?{query}"))
        found = re.search(rb"<PolicyARN>[^<]*</PolicyARN>", described.body)
        if found:
            result = b"<PutScalingPolicyResult>" + found.group(0) + b"</PutScalingPolicyResult>"
            response.body = response.body.replace(b"<PutScalingPolicyResult/>", result)
        return response

    def delete_auto_scaling_group(self, request):
        """AWS deletes a group's scaling policies and scheduled actions with it; moto keeps them."""
        response = self.forward(request)
        group = request.params.get("AutoScalingGroupName", "")
        if response.status != 200:
            return response
        version = request.params.get("Version", "2011-01-01")
        ask = lambda action, **params: self.forward(request.derive("/?" + urlencode(
            {"Action": action, "Version": version, "AutoScalingGroupName": group, **params})))
        for name in re.findall(rb"<PolicyName>([^<]*)</PolicyName>", ask("DescribePolicies").body):
            ask("DeletePolicy", PolicyName=name.decode())
        for name in re.findall(rb"<ScheduledActionName>([^<]*)</ScheduledActionName>", ask("DescribeScheduledActions").body):
            ask("DeleteScheduledAction", ScheduledActionName=name.decode())
        return response

    def register_instance(self, request):
        """AWS updates an instance registered again; moto would list it twice."""
        deregister = {key: request.params.get(key) for key in ("ServiceId", "InstanceId")}
        headers = [
            (name, "Route53AutoNaming_v20170314.DeregisterInstance" if name.lower() == "x-amz-target" else value)
            for name, value in request.headers
        ]
        self.forward(Request("POST", request.target, headers, json.dumps(deregister).encode()))
        return self.forward(request)

    def get_metric_data(self, request):
        """Percentile queries (`pNN`) asked as SampleCount of moto, then answered from the recorded
        PutMetricData samples for each datapoint moto returns."""
        if request.protocol != "query":
            return self.forward(request)
        params = dict(request.params)
        percentiles = {}
        for key, stat in request.params.items():
            match = PERCENTILE.fullmatch(stat) if key.endswith(".MetricStat.Stat") else None
            if match:
                prefix = key[: -len(".MetricStat.Stat")]
                percentiles[params[f"{prefix}.Id"]] = (float(match.group(1)), metric_of(params, f"{prefix}.MetricStat"))
                params[key] = "SampleCount"
        if not percentiles:
            return self.forward(request)
        body = urlencode(params).encode()
        response = self.forward(Request(request.method, request.target, request.headers, body))
        if response.status != 200:
            return response
        with self.state.lock:
            samples = [entry for entry in self.state.recorded if entry["action"] == "PutMetricData"]
        ns = f"{{{CLOUDWATCH_NAMESPACE}}}"
        root = ET.fromstring(response.body)
        for result in root.iter(f"{ns}member"):
            wanted = percentiles.get(result.findtext(f"{ns}Id"))
            values = result.find(f"{ns}Values")
            if wanted is None or values is None:
                continue
            rank, (metric, period) = wanted
            stamps = [parse_time(t.text) for t in result.iterfind(f"{ns}Timestamps/{ns}member")]
            for stamp, value in zip(stamps, values.iterfind(f"{ns}member")):
                value.text = repr(percentile(metric_values(samples, metric, stamp, stamp + period), rank))
        body = ET.tostring(root, default_namespace=CLOUDWATCH_NAMESPACE)
        return Response(200, response.headers, body, response.reason)

    # moto's RegisterImage keeps only the name and description and invents a root device and
    # snapshot; these two make DescribeImages show what was registered, as EC2 would.

    def snapshot_status(self, request, snapshot_id):
        """`completed`, `pending`, … as EC2 would say, or None when there is no such snapshot: the
        proxy's own record of an EBS direct snapshot, else moto's DescribeSnapshots (asked with
        the request's credentials, scoped to EC2)."""
        record = self.snapshot(snapshot_id)
        if record is not None:
            return "completed" if record.completed else "pending"
        auth = re.sub(r"/[a-z0-9-]+/aws4_request", "/ec2/aws4_request", request.header("Authorization") or "")
        headers = [("Content-Type", "application/x-www-form-urlencoded"), ("Authorization", auth)]
        account = request.header("x-moto-account-id")
        if account:
            headers.append(("x-moto-account-id", account))
        body = urlencode({"Action": "DescribeSnapshots", "Version": "2016-11-15", "SnapshotId.1": snapshot_id})
        response = self.forward(Request("POST", "/", headers, body.encode()))
        if response.status != 200:
            return None
        return ET.fromstring(response.body).findtext(".//{*}snapshotSet/{*}item/{*}status")

    def registration_problem(self, request):
        """What EC2 would refuse in this RegisterImage (moto keeps only the name), as (code, message)."""
        params = request.params
        if params.get("Architecture") not in ("x86_64", "arm64", "i386", "x86_64_mac", "arm64_mac"):
            return "InvalidParameterValue", f"Architecture {params.get('Architecture')!r} is not valid"
        root = params.get("RootDeviceName")
        devices, index = {}, 1
        while f"BlockDeviceMapping.{index}.DeviceName" in params:
            devices[params[f"BlockDeviceMapping.{index}.DeviceName"]] = params.get(f"BlockDeviceMapping.{index}.Ebs.SnapshotId")
            index += 1
        if not root or not devices.get(root):
            return "InvalidBlockDeviceMapping", f"the root device {root!r} is not mapped to a snapshot"
        if params.get("EnaSupport") != "true":
            return "InvalidParameterValue", "EnaSupport must be true for Nitro instance types"
        if params.get("BootMode", "uefi") not in ("uefi", "legacy-bios", "uefi-preferred"):
            return "InvalidParameterValue", f"BootMode {params.get('BootMode')!r} is not valid"
        if params.get("ImdsSupport", "v2.0") != "v2.0":
            return "InvalidParameterValue", f"ImdsSupport {params.get('ImdsSupport')!r} is not valid"
        status = self.snapshot_status(request, devices[root])
        if status is None:
            return "InvalidSnapshot.NotFound", f"The snapshot '{devices[root]}' does not exist."
        if status != "completed":
            return "IncorrectState", f"The snapshot '{devices[root]}' is {status}, not completed."
        account = request.header("x-moto-account-id")
        with self.state.lock:
            taken = any(p.get("Name") == params.get("Name") and p.get("_account") == account for p in self.state.registered.values())
        if taken:
            return "InvalidAMIName.Duplicate", f"AMI name {params.get('Name')} is already in use by AMI"
        return None

    def register_image(self, request):
        problem = self.registration_problem(request)
        if problem is not None:
            if problem[0] != "InvalidAMIName.Duplicate":
                self.state.violation(f"RegisterImage: {problem[1]}")
            return query_error("ec2", 400, *problem)
        response = self.forward(request)
        if response.status == 200:
            image_id = ET.fromstring(response.body).findtext("{*}imageId")
            with self.state.lock:
                self.state.registered[image_id] = {**request.params, "_account": request.header("x-moto-account-id")}
        return response

    def image_flag(self, request):
        """Deregistration protection on or off, or a deprecation time, for an image moto has."""
        image_id = request.params.get("ImageId", "")
        query = urlencode({"Action": "DescribeImages", "Version": request.params.get("Version", ""), "ImageId.1": image_id})
        found = self.forward(request.derive(f"/?{query}"))
        if found.status != 200 or b"<imageId>" not in found.body:
            return query_error("ec2", 400, "InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist")
        with self.state.lock:
            if request.action == "EnableImageDeregistrationProtection":
                self.state.protected.add(image_id)
            elif request.action == "DisableImageDeregistrationProtection":
                self.state.protected.discard(image_id)
            elif request.action == "EnableImageDeprecation":
                self.state.deprecations[image_id] = request.params.get("DeprecateAt", "")
            else:
                self.state.deprecations.pop(image_id, None)
        xml = (f'<{request.action}Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
               f"<requestId>bakery-proxy</requestId><return>true</return></{request.action}Response>")
        return Response(200, [("Content-Type", "text/xml")], xml.encode())

    def describe_images(self, request):
        response = self.forward(request)
        with self.state.lock:
            registered = dict(self.state.registered)
            protected = set(self.state.protected)
            deprecations = dict(self.state.deprecations)
        if response.status != 200 or not (registered or protected or deprecations):
            return response
        root = ET.fromstring(response.body)
        namespace = root.tag.split("}")[0] + "}"
        for item in root.iterfind(f"{namespace}imagesSet/{namespace}item"):
            image_id = item.findtext(f"{namespace}imageId")
            ET.SubElement(item, f"{namespace}deregistrationProtection").text = (
                "enabled-without-cooldown" if image_id in protected else "disabled")
            if image_id in deprecations:
                ET.SubElement(item, f"{namespace}deprecationTime").text = deprecations[image_id]
            params = registered.get(image_id)
            if params is None:
                continue
            for tag, key in [
                ("rootDeviceName", "RootDeviceName"),
                ("architecture", "Architecture"),
                ("bootMode", "BootMode"),
                ("imdsSupport", "ImdsSupport"),
                ("enaSupport", "EnaSupport"),
            ]:
                if key in params:
                    element = item.find(f"{namespace}{tag}")
                    if element is None:
                        element = ET.SubElement(item, f"{namespace}{tag}")
                    element.text = params[key]
            mappings = item.find(f"{namespace}blockDeviceMapping")
            if mappings is None:
                mappings = ET.SubElement(item, f"{namespace}blockDeviceMapping")
            for child in list(mappings):
                mappings.remove(child)
            index = 1
            while f"BlockDeviceMapping.{index}.DeviceName" in params:
                prefix = f"BlockDeviceMapping.{index}."
                mapping = ET.SubElement(mappings, f"{namespace}item")
                ET.SubElement(mapping, f"{namespace}deviceName").text = params[prefix + "DeviceName"]
                ebs = ET.SubElement(mapping, f"{namespace}ebs")
                for tag, key in [
                    ("snapshotId", "Ebs.SnapshotId"),
                    ("volumeSize", "Ebs.VolumeSize"),
                    ("volumeType", "Ebs.VolumeType"),
                    ("deleteOnTermination", "Ebs.DeleteOnTermination"),
                ]:
                    if prefix + key in params:
                        ET.SubElement(ebs, f"{namespace}{tag}").text = params[prefix + key]
                index += 1
        ET.register_namespace("", namespace.strip("{}"))
        return Response(response.status, response.headers, ET.tostring(root, encoding="unicode").encode(), response.reason)

    # EBS direct APIs. Each answers as EBS would where moto does not.

    def snapshot(self, snapshot_id):
        with self.state.lock:
            return self.state.snapshots.get(snapshot_id)

    @staticmethod
    def not_found(snapshot_id):
        return ebs_error(404, "ResourceNotFoundException", f"The snapshot '{snapshot_id}' does not exist.", "SNAPSHOT_NOT_FOUND")

    def invalid(self, request, message, reason="INVALID_PARAMETER_VALUE", record=True):
        if record:
            self.state.violation(f"{request.action} {request.path}: {message}")
        return ebs_error(400, "ValidationException", message, reason)

    def start_snapshot(self, request):
        try:
            params = json.loads(request.body or b"{}")
        except ValueError:
            params = {}
        token = params.get("ClientToken")
        with self.state.lock:
            earlier = self.state.client_tokens.get(token) if token else None
        if earlier is not None:
            # As EBS does: the same ClientToken answers with the snapshot it started.
            return json_response(201, earlier)
        parent = params.get("ParentSnapshotId")
        if parent:
            status = self.snapshot_status(request, parent)
            if status is None:
                self.state.violation(f"StartSnapshot: parent {parent} does not exist")
                return self.not_found(parent)
            if status != "completed":
                return self.invalid(request, f"the parent snapshot {parent} is {status}, not completed")
        response = self.forward(request)
        if response.status != 201:
            return response
        result = json.loads(response.body)
        result["BlockSize"] = BLOCK_SIZE
        with self.state.lock:
            self.state.snapshots[result["SnapshotId"]] = SnapshotRecord(parent, result.get("VolumeSize"))
            if token:
                self.state.client_tokens[token] = result
        return response.with_json(result)

    def put_snapshot_block(self, request):
        snapshot_id, index = request.ebs["snapshot"], int(request.ebs["index"])
        record = self.snapshot(snapshot_id)
        if record is None:
            return self.not_found(snapshot_id)
        body = request.body
        # A corrupted block is the network's fault, not the client's: rejected, but no violation.
        corrupted = self.state.take("corrupt_puts", "corrupt_put")
        if corrupted:
            body = flip_byte(body)
        digest = hashlib.sha256(body).digest()
        problem, reason = None, "INVALID_PARAMETER_VALUE"
        if len(body) != BLOCK_SIZE:
            problem = f"block is {len(body)} bytes, must be {BLOCK_SIZE}"
        elif request.header("x-amz-Data-Length") != str(len(body)):
            problem = f"x-amz-Data-Length {request.header('x-amz-Data-Length')!r} does not match the {len(body)}-byte body"
        elif request.header("x-amz-Checksum-Algorithm") != "SHA256":
            problem = f"x-amz-Checksum-Algorithm {request.header('x-amz-Checksum-Algorithm')!r}, must be SHA256"
        elif request.header("x-amz-Checksum") != b64(digest):
            problem = f"x-amz-Checksum {request.header('x-amz-Checksum')!r} does not match the body ({b64(digest)})"
        elif record.volume_size is not None and index >= record.volume_size * BLOCKS_PER_GIB:
            problem, reason = f"block {index} is past the end of a {record.volume_size} GiB volume", "INVALID_BLOCK"
        elif record.completed:
            problem = "the snapshot is already completed"
        if problem:
            return self.invalid(request, problem, reason, record=not corrupted)
        response = self.forward(request)
        if response.status == 201:
            with self.state.lock:
                record.blocks[index] = digest
                self.state.put_blocks += 1
                self.state.put_bytes += len(body)
        return response

    def complete_snapshot(self, request):
        snapshot_id = request.ebs["snapshot"]
        record = self.snapshot(snapshot_id)
        if record is None:
            return self.not_found(snapshot_id)
        with self.state.lock:
            digests = [digest for _, digest in sorted(record.blocks.items())]
        count = request.header("x-amz-ChangedBlocksCount")
        method = request.header("x-amz-Checksum-Aggregation-Method")
        checksum = request.header("x-amz-Checksum")
        if count != str(len(digests)):
            return self.invalid(request, f"x-amz-ChangedBlocksCount {count!r}, but {len(digests)} distinct blocks were put")
        # LINEAR: SHA-256 over the blocks' raw digests in ascending block index (EBS direct API
        # reference, CompleteSnapshot; what coldsnap sends). This stand requires it.
        expected = b64(hashlib.sha256(b"".join(digests)).digest())
        if method != "LINEAR":
            return self.invalid(request, f"x-amz-Checksum-Aggregation-Method {method!r}, must be LINEAR")
        if request.header("x-amz-Checksum-Algorithm") != "SHA256":
            return self.invalid(request, "x-amz-Checksum-Algorithm must be SHA256")
        if checksum != expected:
            return self.invalid(request, f"aggregate x-amz-Checksum {checksum!r}, expected {expected}")
        response = self.forward(request)
        if response.status == 202:
            with self.state.lock:
                record.completed = True
                record.changed_blocks_count = len(digests)
        return response

    def own_blocks(self, request, snapshot_id):
        """{index: token} of the blocks put to this very snapshot, from moto, or moto's error."""
        response = self.forward(request.derive(f"/snapshots/{snapshot_id}/blocks"))
        if response.status != 200:
            return response
        return {block["BlockIndex"]: block["BlockToken"] for block in json.loads(response.body)["Blocks"]}

    def visible_blocks(self, request, snapshot_id):
        """{index: (owner, token)} of the blocks the snapshot shows: its own, then its ancestors'."""
        visible = {}
        with self.state.lock:
            lineage = self.state.lineage(snapshot_id)
        for member in lineage:
            own = self.own_blocks(request, member)
            if isinstance(own, Response):
                return own
            for index, token in own.items():
                visible.setdefault(index, (member, token))
        return visible

    def page(self, request, indexes):
        """The slice of sorted indexes asked for, and the next page token; EBS paginates by index."""
        try:
            start = int(request.query.get("startingBlockIndex", 0))
            limit = int(request.query.get("maxResults", MAX_RESULTS_RANGE[1]))
        except ValueError:
            return self.invalid(request, "startingBlockIndex and maxResults must be integers")
        if not MAX_RESULTS_RANGE[0] <= limit <= MAX_RESULTS_RANGE[1]:
            return self.invalid(request, f"maxResults {limit} is outside {list(MAX_RESULTS_RANGE)}")
        if "pageToken" in request.query:
            token = request.query["pageToken"]
            if not token.isdigit():
                return self.invalid(request, f"pageToken {token!r} was not issued here", "INVALID_PAGE_TOKEN")
            start = max(start, int(token))
        selected = [index for index in indexes if index >= start]
        next_token = str(selected[limit]) if len(selected) > limit else None
        return selected[:limit], next_token

    def list_snapshot_blocks(self, request):
        snapshot_id = request.ebs["snapshot"]
        record = self.snapshot(snapshot_id)
        if record is None:
            return self.not_found(snapshot_id)
        visible = self.visible_blocks(request, snapshot_id)
        if isinstance(visible, Response):
            return visible
        page = self.page(request, sorted(visible))
        if isinstance(page, Response):
            return page
        indexes, next_token = page
        result = {
            "Blocks": [{"BlockIndex": index, "BlockToken": visible[index][1]} for index in indexes],
            "VolumeSize": record.volume_size,
            "BlockSize": BLOCK_SIZE,
        }
        if next_token:
            result["NextToken"] = next_token
        return json_response(200, result)

    def list_changed_blocks(self, request):
        """Blocks that differ between first (optional) and second. moto compares only the blocks put
        to each snapshot itself; here a block differs when a different snapshot wrote it, so for a
        parent and its child the answer is exactly the blocks the child wrote."""
        second_id = request.ebs["snapshot"]
        first_id = request.query.get("firstSnapshotId")
        second = self.snapshot(second_id)
        if second is None:
            return self.not_found(second_id)
        if first_id is not None and self.snapshot(first_id) is None:
            return self.not_found(first_id)
        second_blocks = self.visible_blocks(request, second_id)
        if isinstance(second_blocks, Response):
            return second_blocks
        first_blocks = {}
        if first_id is not None:
            first_blocks = self.visible_blocks(request, first_id)
            if isinstance(first_blocks, Response):
                return first_blocks
        changed = sorted(
            index
            for index in set(first_blocks) | set(second_blocks)
            if first_blocks.get(index, (None,))[0] != second_blocks.get(index, (None,))[0]
        )
        page = self.page(request, changed)
        if isinstance(page, Response):
            return page
        indexes, next_token = page
        blocks = []
        for index in indexes:
            block = {"BlockIndex": index}
            if index in first_blocks:
                block["FirstBlockToken"] = first_blocks[index][1]
            if index in second_blocks:
                block["SecondBlockToken"] = second_blocks[index][1]
            blocks.append(block)
        result = {"ChangedBlocks": blocks, "VolumeSize": second.volume_size, "BlockSize": BLOCK_SIZE}
        if next_token:
            result["NextToken"] = next_token
        return json_response(200, result)

    def get_snapshot_block(self, request):
        snapshot_id, index = request.ebs["snapshot"], int(request.ebs["index"])
        if self.snapshot(snapshot_id) is None:
            return self.not_found(snapshot_id)
        with self.state.lock:
            lineage = self.state.lineage(snapshot_id)
            owner = next((member for member in lineage if index in self.state.snapshots[member].blocks), None)
        if owner is None:
            return self.invalid(request, f"block {index} was never written to this snapshot or its ancestors", "INVALID_BLOCK_TOKEN")
        target = request.target
        if owner != snapshot_id:
            # moto ignores the block token and looks the block up by snapshot and index.
            target = f"/snapshots/{owner}/blocks/{index}?{urlencode(request.query)}"
        response = self.forward(request.derive(target))
        if response.status == 200 and self.state.take("corrupt_gets", "corrupt_get"):
            response.body = flip_byte(response.body)  # x-amz-Checksum still describes the original
        return response

    # ELBv2

    def describe_target_health(self, request):
        response = self.forward(request)
        with self.state.lock:
            now = time.monotonic()
            overrides = self.state.health_overrides = [
                override for override in self.state.health_overrides if override["until"] is None or override["until"] > now
            ]
        if response.status != 200 or not overrides:
            return response
        group = request.params.get("TargetGroupArn")
        ns = f"{{{ELBV2_NAMESPACE}}}"
        root = ET.fromstring(response.body)
        for member in root.iterfind(f"{ns}DescribeTargetHealthResult/{ns}TargetHealthDescriptions/{ns}member"):
            target_id = member.findtext(f"{ns}Target/{ns}Id")
            health = member.find(f"{ns}TargetHealth")
            if health is None or health.findtext(f"{ns}State") == "unused":
                continue
            matching = [
                override
                for override in overrides
                if override["target_group_arn"] in (None, group) and (override["targets"] is None or target_id in override["targets"])
            ]
            if not matching:
                continue
            state = matching[-1]["state"]  # the latest override wins
            for child in list(health):
                health.remove(child)
            ET.SubElement(health, f"{ns}State").text = state
            if HEALTH_REASONS[state]:
                reason, description = HEALTH_REASONS[state]
                ET.SubElement(health, f"{ns}Reason").text = reason
                ET.SubElement(health, f"{ns}Description").text = description
        return Response(response.status, response.headers, ET.tostring(root, encoding="unicode").encode(), response.reason)

    # The control API. Every answer is JSON; a refused request gets 400 {"error": ...}.

    def control(self, method, path, query, body):
        routes = {
            ("GET", "/_proxy/stats"): self.get_stats,
            ("GET", "/_proxy/requests"): self.get_requests,
            ("POST", "/_proxy/faults"): self.set_faults,
            ("POST", "/_proxy/corrupt"): self.set_corrupt,
            ("POST", "/_proxy/target-health"): self.add_health_override,
            ("DELETE", "/_proxy/target-health"): self.clear_health_overrides,
            ("POST", "/_proxy/reset"): self.reset,
        }
        route = routes.get((method, path))
        if route is None:
            return json_response(404, {"error": f"no control endpoint {method} {path}"})
        try:
            return json_response(200, route(query, body))
        except ValueError as error:
            return json_response(400, {"error": str(error)})

    def get_stats(self, query, body):
        """GET /_proxy/stats"""
        state = self.state
        with state.lock:
            return {
                "requests": dict(state.requests),
                "put_blocks": state.put_blocks,
                "put_bytes": state.put_bytes,
                "violations": list(state.violations),
                "faults": dict(state.faults),
                "snapshots": {snapshot_id: record.to_json() for snapshot_id, record in state.snapshots.items()},
            }

    def get_requests(self, query, body):
        """GET /_proxy/requests[?action=A][&account=ID]: the query API requests, oldest first."""
        with self.state.lock:
            return [
                entry
                for entry in self.state.recorded
                if query.get("action", entry["action"]) == entry["action"]
                and query.get("account", entry["account"]) == entry["account"]
            ]

    def set_faults(self, query, body):
        """POST /_proxy/faults {"throttle", "server_error", "drop", "lost": rates, "seed", "actions",
        "max" (faults in all), "per_action" (faults per action)}: replaces the fault plan ({} turns
        faults off)."""
        plan = FaultPlan(load_object(body, (*FAULT_KINDS, "seed", "actions", "max", "per_action")))
        with self.state.lock:
            self.state.fault_plan = plan
        return plan.config

    def set_corrupt(self, query, body):
        """POST /_proxy/corrupt {"put_blocks": N, "get_blocks": M}: flip a byte in the next N
        PutSnapshotBlock bodies and the next M GetSnapshotBlock bodies (replaces pending counts)."""
        config = load_object(body, ("put_blocks", "get_blocks"))
        puts, gets = (number(config, key, 0, 0) for key in ("put_blocks", "get_blocks"))
        with self.state.lock:
            self.state.corrupt_puts, self.state.corrupt_gets = int(puts), int(gets)
        return {"put_blocks": int(puts), "get_blocks": int(gets)}

    def add_health_override(self, query, body):
        """POST /_proxy/target-health {"state", "target_group_arn"?, "targets"?, "seconds"?}: from now
        on DescribeTargetHealth reports `state` for the matching registered targets (all when a
        field is left out), for `seconds` if given. Overrides stack; the latest matching wins."""
        config = load_object(body, ("state", "target_group_arn", "targets", "seconds"))
        if config.get("state") not in HEALTH_REASONS:
            raise ValueError(f"state must be one of {sorted(HEALTH_REASONS)}")
        group = config.get("target_group_arn")
        if group is not None and not isinstance(group, str):
            raise ValueError("target_group_arn must be a string")
        seconds = number(config, "seconds", None, 0)
        override = {
            "state": config["state"],
            "target_group_arn": group,
            "targets": string_list(config, "targets"),
            "until": None if seconds is None else time.monotonic() + seconds,
        }
        with self.state.lock:
            self.state.health_overrides.append(override)
        return {key: value for key, value in override.items() if key != "until"} | {"seconds": seconds}

    def clear_health_overrides(self, query, body):
        """DELETE /_proxy/target-health"""
        with self.state.lock:
            self.state.health_overrides = []
        return {}

    def reset(self, query, body):
        """POST /_proxy/reset: forget everything, and reset moto too."""
        with self.state.lock:
            self.state.clear()
        response = self.forward(Request("POST", "/moto-api/reset", [], b""))
        if response.status != 200:
            raise ValueError(f"moto's reset answered {response.status}: {response.body[:200]!r}")
        return {}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with the clients
    proxy = None  # set by serve()

    def handle_request(self):
        try:
            body = self.read_body()
        except (ValueError, ConnectionError) as error:
            self.log_error("unreadable request body: %s", error)
            self.close_connection = True
            return
        url = urlsplit(self.path)
        if url.path.startswith("/_proxy/"):
            response = self.proxy.control(self.command, url.path, dict(parse_qsl(url.query)), body)
        else:
            headers = [(name, value) for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP]
            try:
                response = self.proxy.serve(Request(self.command, self.path, headers, body))
            except Exception:
                # A bug here must not look like an injected drop: answer, and log the traceback.
                self.log_error("proxy error on %s %s:\n%s", self.command, self.path, traceback.format_exc())
                response = Response(502, [("Content-Type", "text/plain")], b"proxy error: see the proxy's log\n")
        if response is DROP:
            self.close_connection = True
            return
        self.send_response_only(response.status, response.reason)
        for name, value in response.headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = handle_request

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ConnectionError(f"client sent {len(body)} of {length} bytes")
        return body

    def log_request(self, code="-", size="-"):
        pass  # one line per block would drown the log; errors are still logged


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # parallel uploaders open many connections at once

    def server_bind(self):
        # Set before listen(): accepted sockets inherit the buffers.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        super().server_bind()

    def get_request(self):
        conn, address = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body go in two writes
        return conn, address


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moto", required=True, help="moto's URL, http://127.0.0.1:PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    moto = urlsplit(args.moto)
    Handler.proxy = Proxy(moto.hostname, moto.port)
    server = Server((args.host, args.port), Handler)
    print(f"proxy: listening on http://{args.host}:{server.server_address[1]}, moto at {args.moto}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
