#!/usr/bin/env python3
"""Self-test of tests/aws/proxy.py in front of moto, through boto3, as `scripts/moto-server run`
starts them. Run with the venv's python: $BAKERY_VENV/bin/python tests/aws/test_proxy.py
"""

import base64
import hashlib
import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode, urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK_SIZE = 524288
ACCOUNT = "111122223333"
# What moto needs to route a hand-made request to EBS (it checks no signature).
MONITORING_AUTHORIZATION = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/monitoring/aws4_request, SignedHeaders=host, Signature=0"
EBS_AUTHORIZATION = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/ebs/aws4_request, SignedHeaders=host, Signature=0"

server = None  # the `scripts/moto-server run` process
endpoint = None  # the proxy's URL


def setUpModule():
    global server, endpoint
    log_dir = tempfile.mkdtemp(prefix="moto-server-logs-")
    server = subprocess.Popen(
        [os.path.join(ROOT, "scripts", "moto-server"), "run", "--log-dir", log_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"scripts/moto-server run printed nothing (logs in {log_dir})")
    endpoint = json.loads(line)["endpoint"]


def tearDownModule():
    server.stdin.close()  # as when the test process dies
    server.wait(timeout=30)


def client(service, attempts=1):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"}),
    )


def with_account(aws_client, account):
    """Sends x-moto-account-id with every request, as parallel tests do to isolate themselves."""

    def add_header(request, **_):
        request.headers["x-moto-account-id"] = account

    aws_client.meta.events.register("before-sign", add_header)
    return aws_client


def raw(method, path, body=None, headers=None):
    """A request to the proxy: (status, headers, body)."""
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def control(method, path, value=None):
    status, _, body = raw(method, path, None if value is None else json.dumps(value))
    assert status == 200, (method, path, status, body)
    return json.loads(body)


def block(seed):
    return random.Random(seed).randbytes(BLOCK_SIZE)


def checksum(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def put(ebs, snapshot_id, index, data, **overrides):
    args = dict(
        SnapshotId=snapshot_id,
        BlockIndex=index,
        BlockData=data,
        DataLength=len(data),
        Checksum=checksum(data),
        ChecksumAlgorithm="SHA256",
    )
    return ebs.put_snapshot_block(**{**args, **overrides})


def linear(blocks):
    """The LINEAR aggregate over {index: data}."""
    digests = b"".join(hashlib.sha256(blocks[index]).digest() for index in sorted(blocks))
    return base64.b64encode(hashlib.sha256(digests).digest()).decode()


def snapshot_with(ebs, blocks, parent=None):
    """A completed snapshot holding {index: data}."""
    extra = {"ParentSnapshotId": parent} if parent else {}
    snapshot_id = ebs.start_snapshot(VolumeSize=1, **extra)["SnapshotId"]
    for index, data in blocks.items():
        put(ebs, snapshot_id, index, data)
    ebs.complete_snapshot(
        SnapshotId=snapshot_id,
        ChangedBlocksCount=len(blocks),
        Checksum=linear(blocks),
        ChecksumAlgorithm="SHA256",
        ChecksumAggregationMethod="LINEAR",
    )
    return snapshot_id


def read_block(ebs, snapshot_id, index, token):
    response = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
    return response["BlockData"].read(), response["Checksum"]


class ProxyTest(unittest.TestCase):
    def setUp(self):
        control("POST", "/_proxy/reset")
        self.ebs = client("ebs")

    def assertError(self, call, code, status):
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            call()
        error = caught.exception.response
        self.assertEqual((error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]), (code, status))

    def tokens(self, snapshot_id):
        return {b["BlockIndex"]: b["BlockToken"] for b in self.ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]}


class EbsTest(ProxyTest):
    def test_round_trip(self):
        blocks = {0: block(1), 5: block(2)}
        started = self.ebs.start_snapshot(VolumeSize=1, Description="round trip")
        self.assertEqual(started["BlockSize"], BLOCK_SIZE)
        snapshot_id = started["SnapshotId"]
        for index, data in blocks.items():
            self.assertEqual(put(self.ebs, snapshot_id, index, data)["Checksum"], checksum(data))
        completed = self.ebs.complete_snapshot(
            SnapshotId=snapshot_id,
            ChangedBlocksCount=2,
            Checksum=linear(blocks),
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        )
        self.assertEqual(completed["Status"], "completed")
        listed = self.ebs.list_snapshot_blocks(SnapshotId=snapshot_id)
        self.assertEqual(listed["BlockSize"], BLOCK_SIZE)
        self.assertEqual([b["BlockIndex"] for b in listed["Blocks"]], [0, 5])
        for entry in listed["Blocks"]:
            data, reported = read_block(self.ebs, snapshot_id, entry["BlockIndex"], entry["BlockToken"])
            self.assertEqual(data, blocks[entry["BlockIndex"]])
            self.assertEqual(reported, checksum(data))
        stats = control("GET", "/_proxy/stats")
        self.assertEqual(stats["violations"], [])
        self.assertEqual((stats["put_blocks"], stats["put_bytes"]), (2, 2 * BLOCK_SIZE))
        self.assertEqual(
            stats["snapshots"][snapshot_id],
            {
                "parent": None,
                "blocks": {str(i): hashlib.sha256(d).hexdigest() for i, d in blocks.items()},
                "completed": True,
                "changed_blocks_count": 2,
            },
        )
        self.assertEqual(stats["requests"]["PutSnapshotBlock"], 2)

    def test_rejects_bad_blocks_and_completions(self):
        snapshot_id = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        data = block(3)
        rejected = [
            lambda: put(self.ebs, snapshot_id, 0, data, Checksum=checksum(b"other")),
            lambda: put(self.ebs, snapshot_id, 0, data[:4096]),
            lambda: put(self.ebs, snapshot_id, 2048, data),  # past the end of 1 GiB
            lambda: self.ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=2),
            lambda: self.ebs.complete_snapshot(
                SnapshotId=snapshot_id,
                ChangedBlocksCount=1,
                Checksum=checksum(data),  # the block's digest, not the aggregate
                ChecksumAlgorithm="SHA256",
                ChecksumAggregationMethod="LINEAR",
            ),
        ]
        for index, call in enumerate(rejected):
            with self.subTest(index):
                if index == 3:
                    put(self.ebs, snapshot_id, 7, data)  # one block, so the counts below are wrong
                self.assertError(call, "ValidationException", 400)
        stats = control("GET", "/_proxy/stats")
        self.assertEqual(len(stats["violations"]), 5, stats["violations"])
        self.assertEqual(stats["put_blocks"], 1)  # no rejected block reached moto
        self.assertFalse(stats["snapshots"][snapshot_id]["completed"])
        self.assertEqual(list(self.tokens(snapshot_id)), [7])

    def test_a_completion_needs_the_linear_aggregate(self):
        snapshot_id = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        put(self.ebs, snapshot_id, 0, block(5))
        self.assertError(
            lambda: self.ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=1), "ValidationException", 400
        )
        self.assertFalse(control("GET", "/_proxy/stats")["snapshots"][snapshot_id]["completed"])

    def test_a_parent_must_exist_and_be_completed(self):
        pending = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        self.assertError(lambda: self.ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=pending), "ValidationException", 400)
        self.assertError(
            lambda: self.ebs.start_snapshot(VolumeSize=1, ParentSnapshotId="snap-0123456789abcdef0"), "ResourceNotFoundException", 404
        )
        # One EC2 made (moto's snapshots of volumes are completed at once) is a parent too.
        ec2 = client("ec2")
        volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
        made = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
        self.assertTrue(self.ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=made)["SnapshotId"])

    def test_a_client_token_starts_one_snapshot(self):
        first = self.ebs.start_snapshot(VolumeSize=1, ClientToken="bake-1")["SnapshotId"]
        again = self.ebs.start_snapshot(VolumeSize=1, ClientToken="bake-1")["SnapshotId"]
        other = self.ebs.start_snapshot(VolumeSize=1, ClientToken="bake-2")["SnapshotId"]
        self.assertEqual(first, again)
        self.assertNotEqual(first, other)

    def test_unknown_snapshot_is_not_found(self):
        self.assertError(lambda: put(self.ebs, "snap-0123456789abcdef0", 0, block(4)), "ResourceNotFoundException", 404)

    def test_parent_union(self):
        parent_blocks = {0: block(10), 1: block(11)}
        parent = snapshot_with(self.ebs, parent_blocks)
        child_blocks = {1: block(21), 2: block(22)}
        child = snapshot_with(self.ebs, child_blocks, parent=parent)
        visible = {**parent_blocks, **child_blocks}
        tokens = self.tokens(child)
        self.assertEqual(sorted(tokens), [0, 1, 2])
        for index, token in tokens.items():
            self.assertEqual(read_block(self.ebs, child, index, token)[0], visible[index])
        changed = self.ebs.list_changed_blocks(FirstSnapshotId=parent, SecondSnapshotId=child)
        self.assertEqual(changed["BlockSize"], BLOCK_SIZE)
        self.assertEqual([b["BlockIndex"] for b in changed["ChangedBlocks"]], [1, 2])
        self.assertEqual([("FirstBlockToken" in b) for b in changed["ChangedBlocks"]], [True, False])
        everything = self.ebs.list_changed_blocks(SecondSnapshotId=child)["ChangedBlocks"]
        self.assertEqual([b["BlockIndex"] for b in everything], [0, 1, 2])
        stats = control("GET", "/_proxy/stats")
        self.assertEqual(stats["snapshots"][child]["parent"], parent)
        self.assertEqual(stats["violations"], [])

    def test_pagination(self):
        data = block(5)
        snapshot_id = snapshot_with(self.ebs, {index: data for index in range(103)})
        pages = [self.ebs.list_snapshot_blocks(SnapshotId=snapshot_id, MaxResults=100)]
        while "NextToken" in pages[-1]:  # boto3 has no paginator for it
            pages.append(self.ebs.list_snapshot_blocks(SnapshotId=snapshot_id, MaxResults=100, NextToken=pages[-1]["NextToken"]))
        self.assertEqual([len(page["Blocks"]) for page in pages], [100, 3])
        self.assertEqual([b["BlockIndex"] for page in pages for b in page["Blocks"]], list(range(103)))
        later = self.ebs.list_snapshot_blocks(SnapshotId=snapshot_id, StartingBlockIndex=101)["Blocks"]
        self.assertEqual([b["BlockIndex"] for b in later], [101, 102])
        # boto3 refuses MaxResults under 100 itself; the Rust SDK does not check ranges.
        status, headers, _ = raw("GET", f"/snapshots/{snapshot_id}/blocks?maxResults=10", headers={"Authorization": EBS_AUTHORIZATION})
        self.assertEqual((status, headers["x-amzn-ErrorType"]), (400, "ValidationException"))

    def test_account_header_reaches_moto(self):
        ebs = with_account(client("ebs"), ACCOUNT)
        self.assertEqual(ebs.start_snapshot(VolumeSize=1)["OwnerId"], ACCOUNT)

    def test_expect_100_continue(self):
        snapshot_id = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        data = block(6)
        url = urlsplit(endpoint)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.putrequest("PUT", f"/snapshots/{snapshot_id}/blocks/0")
        for name, value in {
            "Authorization": EBS_AUTHORIZATION,
            "Content-Length": str(len(data)),
            "Expect": "100-continue",
            "x-amz-Data-Length": str(len(data)),
            "x-amz-Checksum": checksum(data),
            "x-amz-Checksum-Algorithm": "SHA256",
        }.items():
            conn.putheader(name, value)
        conn.endheaders()
        interim = conn.sock.recv(64)  # the proxy must invite the body before it is sent
        self.assertTrue(interim.startswith(b"HTTP/1.1 100"), interim)
        conn.send(data)
        response = conn.getresponse()
        self.assertEqual(response.status, 201, response.read())
        conn.close()
        self.assertEqual(control("GET", "/_proxy/stats")["put_blocks"], 1)

    def test_parallel_uploads(self):
        snapshot_id = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        data = {index: block(100 + index) for index in range(64)}
        clients = threading.local()

        def upload(index):
            if not hasattr(clients, "ebs"):
                clients.ebs = client("ebs")
            put(clients.ebs, snapshot_id, index, data[index])

        began = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, data))
        seconds = time.monotonic() - began
        print(f"\n  64 blocks from 8 threads: {64 * BLOCK_SIZE / seconds / 1e6:.0f} MB/s through the proxy", file=sys.stderr)
        stats = control("GET", "/_proxy/stats")
        self.assertEqual((stats["put_blocks"], stats["violations"]), (64, []))
        self.assertEqual(sorted(self.tokens(snapshot_id)), list(range(64)))


class FaultTest(ProxyTest):
    def tearDown(self):
        control("POST", "/_proxy/faults", {})

    def test_status_codes(self):
        snapshot_id = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        cases = [
            ("throttle", "ListSnapshotBlocks", lambda: self.ebs.list_snapshot_blocks(SnapshotId=snapshot_id), "RequestThrottledException", 400),
            ("server_error", "PutSnapshotBlock", lambda: put(self.ebs, snapshot_id, 0, block(7)), "InternalServerException", 500),
            ("throttle", "DescribeImages", lambda: client("ec2").describe_images(), "RequestLimitExceeded", 503),
            ("server_error", "DescribeVpcs", lambda: client("ec2").describe_vpcs(), "InternalError", 500),
            ("throttle", "DescribeAutoScalingGroups", lambda: client("autoscaling").describe_auto_scaling_groups(), "Throttling", 400),
            ("throttle", "DescribeTargetGroups", lambda: client("elbv2").describe_target_groups(), "Throttling", 400),
            ("server_error", "DescribeTargetGroups", lambda: client("elbv2").describe_target_groups(), "InternalFailure", 500),
            ("throttle", "ListNamespaces", lambda: client("servicediscovery").list_namespaces(), "ThrottlingException", 400),
        ]
        for kind, action, call, code, status in cases:
            with self.subTest(f"{kind} {action}"):
                control("POST", "/_proxy/faults", {kind: 1.0, "actions": [action]})
                self.assertError(call, code, status)
        self.assertEqual(control("GET", "/_proxy/stats")["faults"], {"throttle": 5, "server_error": 3})

    def test_lost_replies_take_effect(self):
        control("POST", "/_proxy/faults", {"lost": 1.0, "actions": ["CreateLaunchTemplate"], "max": 1})
        ec2 = client("ec2")
        with self.assertRaises(botocore.exceptions.ConnectionClosedError):
            ec2.create_launch_template(LaunchTemplateName="lost-reply", LaunchTemplateData={})
        found = ec2.describe_launch_templates(LaunchTemplateNames=["lost-reply"])["LaunchTemplates"]
        self.assertEqual(len(found), 1)
        self.assertEqual(control("GET", "/_proxy/stats")["faults"], {"lost": 1})

    def test_drop(self):
        control("POST", "/_proxy/faults", {"drop": 1.0})
        with self.assertRaises(botocore.exceptions.ConnectionClosedError):
            client("ec2").describe_vpcs()
        # Never applied to the control API or moto's own.
        self.assertEqual(raw("GET", "/moto-api/data.json")[0], 200)
        self.assertEqual(control("GET", "/_proxy/stats")["faults"], {"drop": 1})

    def test_max_and_retries(self):
        control("POST", "/_proxy/faults", {"throttle": 1.0, "max": 2})
        ec2 = client("ec2", attempts=3)
        response = ec2.describe_vpcs()
        self.assertEqual(response["ResponseMetadata"]["RetryAttempts"], 2)
        self.assertEqual(control("GET", "/_proxy/stats")["faults"], {"throttle": 2})

    def test_per_action_limits_each_action(self):
        control("POST", "/_proxy/faults", {"throttle": 1.0, "per_action": 1})
        ec2 = client("ec2", attempts=3)
        self.assertEqual(ec2.describe_vpcs()["ResponseMetadata"]["RetryAttempts"], 1)
        self.assertEqual(ec2.describe_subnets()["ResponseMetadata"]["RetryAttempts"], 1)
        self.assertEqual(ec2.describe_vpcs()["ResponseMetadata"]["RetryAttempts"], 0)
        self.assertEqual(control("GET", "/_proxy/stats")["faults"], {"throttle": 2})

    def test_seed_repeats(self):
        def pattern():
            control("POST", "/_proxy/faults", {"server_error": 0.5, "seed": 7})
            ec2 = client("ec2")
            outcome = []
            for _ in range(16):
                try:
                    ec2.describe_vpcs()
                    outcome.append(True)
                except botocore.exceptions.ClientError:
                    outcome.append(False)
            return outcome

        first = pattern()
        self.assertIn(True, first)
        self.assertIn(False, first)
        self.assertEqual(pattern(), first)

    def test_bad_config_refused(self):
        for config in ({"throttle": 2}, {"throttle": 0.6, "drop": 0.6}, {"throtle": 0.1}, {"actions": "PutSnapshotBlock"}):
            with self.subTest(config):
                self.assertEqual(raw("POST", "/_proxy/faults", json.dumps(config))[0], 400)

    def test_corrupt_put(self):
        snapshot_id = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        control("POST", "/_proxy/corrupt", {"put_blocks": 1})
        data = block(8)
        self.assertError(lambda: put(self.ebs, snapshot_id, 0, data), "ValidationException", 400)
        put(self.ebs, snapshot_id, 0, data)  # the retry goes through
        stats = control("GET", "/_proxy/stats")
        self.assertEqual((stats["violations"], stats["faults"], stats["put_blocks"]), ([], {"corrupt_put": 1}, 1))

    def test_corrupt_get(self):
        data = block(9)
        snapshot_id = snapshot_with(self.ebs, {0: data})
        token = self.tokens(snapshot_id)[0]
        control("POST", "/_proxy/corrupt", {"get_blocks": 1})
        corrupted, reported = read_block(self.ebs, snapshot_id, 0, token)
        self.assertEqual(len(corrupted), BLOCK_SIZE)
        self.assertNotEqual(checksum(corrupted), reported)  # what a careful client checks
        self.assertEqual(read_block(self.ebs, snapshot_id, 0, token)[0], data)
        self.assertEqual(control("GET", "/_proxy/stats")["faults"], {"corrupt_get": 1})


class QueryTest(ProxyTest):
    def test_register_image_recorded(self):
        ebs = with_account(client("ebs"), ACCOUNT)
        snapshot_id = snapshot_with(ebs, {0: block(12)})
        ec2 = with_account(client("ec2"), ACCOUNT)
        image_id = ec2.register_image(
            Name="bakery-test-v001",
            Architecture="x86_64",
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot_id, "VolumeType": "gp3"}}],
            VirtualizationType="hvm",
            EnaSupport=True,
            BootMode="uefi",
            ImdsSupport="v2.0",
        )["ImageId"]
        ec2.describe_images(ImageIds=[image_id])
        recorded = control("GET", "/_proxy/requests?action=RegisterImage")
        self.assertEqual(len(recorded), 1)
        entry = recorded[0]
        self.assertEqual((entry["action"], entry["service"], entry["account"]), ("RegisterImage", "ec2", ACCOUNT))
        params = entry["params"]
        self.assertEqual(params["BlockDeviceMapping.1.Ebs.SnapshotId"], snapshot_id)
        self.assertEqual((params["EnaSupport"], params["BootMode"], params["ImdsSupport"]), ("true", "uefi", "v2.0"))
        self.assertEqual(len(control("GET", "/_proxy/requests")), 2)
        self.assertEqual(control("GET", f"/_proxy/requests?action=RegisterImage&account={ACCOUNT}x"), [])
        # moto keeps accounts apart: the default account does not see the image.
        self.assertError(lambda: client("ec2").describe_images(ImageIds=[image_id]), "InvalidAMIID.NotFound", 400)

    def test_launch_template_names_are_checked(self):
        ec2 = client("ec2")
        for bad in ("hello-prod-canary~1-v000", "ab", "x" * 129):
            self.assertError(
                lambda: ec2.create_launch_template(LaunchTemplateName=bad, LaunchTemplateData={}),
                "InvalidLaunchTemplateName.MalformedException",
                400,
            )
        created = ec2.create_launch_template(LaunchTemplateName="hello-prod-canary(7e)1-v000", LaunchTemplateData={})
        self.assertEqual(created["LaunchTemplate"]["LaunchTemplateName"], "hello-prod-canary(7e)1-v000")

    def test_a_protected_image_is_not_deregistered_and_flags_show(self):
        ec2 = client("ec2")
        volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
        snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
        image = ec2.register_image(
            Name="hello-1", Architecture="x86_64", RootDeviceName="/dev/xvda", EnaSupport=True,
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}])["ImageId"]
        ec2.enable_image_deregistration_protection(ImageId=image)
        ec2.enable_image_deprecation(ImageId=image, DeprecateAt="2030-01-01T00:00:00Z")
        described = ec2.describe_images(ImageIds=[image])["Images"][0]
        self.assertEqual(described["DeregistrationProtection"], "enabled-without-cooldown")
        self.assertTrue(described["DeprecationTime"].startswith("2030-01-01T00:00:00"), described)
        self.assertError(lambda: ec2.deregister_image(ImageId=image), "OperationNotPermitted", 400)
        ec2.disable_image_deprecation(ImageId=image)
        self.assertNotIn("DeprecationTime", ec2.describe_images(ImageIds=[image])["Images"][0])
        ec2.disable_image_deregistration_protection(ImageId=image)
        ec2.deregister_image(ImageId=image)
        self.assertError(lambda: ec2.enable_image_deregistration_protection(ImageId="ami-12345678"),
                         "InvalidAMIID.NotFound", 400)

    def test_a_new_scaling_policy_is_answered_with_its_arn_and_goes_with_its_group(self):
        client("ec2").create_launch_template(LaunchTemplateName="hello-v000", LaunchTemplateData={"ImageId": "ami-12345678"})
        autoscaling = client("autoscaling")
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName="hello-v000", LaunchTemplate={"LaunchTemplateName": "hello-v000"},
            MinSize=0, MaxSize=0, AvailabilityZones=["us-east-1a"])
        put = autoscaling.put_scaling_policy(
            AutoScalingGroupName="hello-v000", PolicyName="up", AdjustmentType="ChangeInCapacity", ScalingAdjustment=1)
        described = autoscaling.describe_policies(AutoScalingGroupName="hello-v000")["ScalingPolicies"]
        self.assertEqual(put["PolicyARN"], described[0]["PolicyARN"])
        self.assertTrue(put["PolicyARN"].endswith(":autoScalingGroupName/hello-v000:policyName/up"), put)
        autoscaling.put_scheduled_update_group_action(
            AutoScalingGroupName="hello-v000", ScheduledActionName="nightly", Recurrence="0 2 * * *", MinSize=0)
        autoscaling.delete_auto_scaling_group(AutoScalingGroupName="hello-v000", ForceDelete=True)
        self.assertEqual(autoscaling.describe_policies()["ScalingPolicies"], [], "deleted with the group")
        self.assertEqual(autoscaling.describe_scheduled_actions()["ScheduledUpdateGroupActions"], [])

    def test_registrations_are_checked_as_ec2_checks_them(self):
        ebs = with_account(client("ebs"), ACCOUNT)
        ec2 = with_account(client("ec2"), ACCOUNT)
        completed = snapshot_with(ebs, {0: block(13)})
        pending = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]

        def register(name, snapshot=completed, **overrides):
            args = dict(
                Name=name,
                Architecture="x86_64",
                RootDeviceName="/dev/xvda",
                BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}],
                EnaSupport=True,
                BootMode="uefi",
                ImdsSupport="v2.0",
            )
            return ec2.register_image(**{**args, **overrides})["ImageId"]

        refused = [
            (lambda: register("image-a", Architecture="sparc"), "InvalidParameterValue"),
            (lambda: register("image-b", RootDeviceName="/dev/sda1"), "InvalidBlockDeviceMapping"),
            (lambda: register("image-c", EnaSupport=False), "InvalidParameterValue"),
            (lambda: register("image-d", BootMode="bios"), "InvalidParameterValue"),
            (lambda: register("image-e", snapshot=pending), "IncorrectState"),
            (lambda: register("image-f", snapshot="snap-0123456789abcdef0"), "InvalidSnapshot.NotFound"),
        ]
        for call, code in refused:
            with self.subTest(code):
                self.assertError(call, code, 400)
        image_id = register("good")
        self.assertError(lambda: register("good"), "InvalidAMIName.Duplicate", 400)
        ec2.deregister_image(ImageId=image_id)
        self.assertTrue(register("good"))
        self.assertEqual(len(control("GET", "/_proxy/stats")["violations"]), 6)

    def test_target_health_override(self):
        ec2, elbv2 = client("ec2"), client("elbv2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        instances = [i["InstanceId"] for i in ec2.run_instances(ImageId="ami-12345678", MinCount=2, MaxCount=2, SubnetId=subnet)["Instances"]]
        group = elbv2.create_target_group(Name="web", Protocol="HTTP", Port=8080, VpcId=vpc)["TargetGroups"][0]["TargetGroupArn"]
        elbv2.register_targets(TargetGroupArn=group, Targets=[{"Id": instance} for instance in instances])

        def health():
            descriptions = elbv2.describe_target_health(TargetGroupArn=group)["TargetHealthDescriptions"]
            return {d["Target"]["Id"]: (d["TargetHealth"]["State"], d["TargetHealth"].get("Reason")) for d in descriptions}

        self.assertEqual(set(health().values()), {("healthy", None)})
        control("POST", "/_proxy/target-health", {"state": "unhealthy", "target_group_arn": group, "targets": [instances[0]]})
        self.assertEqual(health(), {instances[0]: ("unhealthy", "Target.FailedHealthChecks"), instances[1]: ("healthy", None)})
        control("POST", "/_proxy/target-health", {"state": "initial", "seconds": 1})
        self.assertEqual(set(health().values()), {("initial", "Elb.RegistrationInProgress")})
        time.sleep(1.2)
        self.assertEqual(health()[instances[0]], ("unhealthy", "Target.FailedHealthChecks"))
        control("POST", "/_proxy/target-health", {"state": "unhealthy", "target_group_arn": group + "-other"})
        self.assertEqual(health()[instances[1]], ("healthy", None))
        control("DELETE", "/_proxy/target-health")
        self.assertEqual(set(health().values()), {("healthy", None)})
        # A target that is not registered stays "unused" whatever the override.
        control("POST", "/_proxy/target-health", {"state": "unhealthy"})
        unused = elbv2.describe_target_health(TargetGroupArn=group, Targets=[{"Id": "i-0000000000000000f"}])
        self.assertEqual(unused["TargetHealthDescriptions"][0]["TargetHealth"]["State"], "unused")

    def test_registering_again_updates_the_one_entry(self):
        discovery = client("servicediscovery")
        discovery.create_http_namespace(Name="bakery")
        namespace = discovery.list_namespaces()["Namespaces"][0]["Id"]
        service = discovery.create_service(Name="hello", NamespaceId=namespace, HealthCheckCustomConfig={})["Service"]["Id"]
        for status in ("STARTING", "UP"):
            discovery.register_instance(ServiceId=service, InstanceId="i-1", Attributes={"status": status})
        instances = discovery.list_instances(ServiceId=service)["Instances"]
        self.assertEqual([(i["Id"], i["Attributes"]["status"]) for i in instances], [("i-1", "UP")])
        recorded = control("GET", "/_proxy/requests?action=RegisterInstance")
        self.assertEqual([r["params"]["Attributes"]["status"] for r in recorded], ["STARTING", "UP"])

    def test_percentiles_come_from_the_recorded_samples(self):
        dimensions = [{"Name": "TargetGroup", "Value": "targetgroup/web/1"}]
        now = time.time()
        client("cloudwatch").put_metric_data(
            Namespace="AWS/ApplicationELB",
            MetricData=[
                {"MetricName": "TargetResponseTime", "Dimensions": dimensions, "Timestamp": now, "Values": [0.1, 0.2, 3.0], "Counts": [90, 9, 1]},
                {"MetricName": "TargetResponseTime", "Dimensions": [], "Timestamp": now, "Value": 9.0},
            ],
        )

        def query(stat):
            form = {
                "Action": "GetMetricData",
                "Version": "2010-08-01",
                "StartTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 30)),
                "EndTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 30)),
                "MetricDataQueries.member.1.Id": "q",
                "MetricDataQueries.member.1.MetricStat.Stat": stat,
                "MetricDataQueries.member.1.MetricStat.Period": "60",
                "MetricDataQueries.member.1.MetricStat.Metric.Namespace": "AWS/ApplicationELB",
                "MetricDataQueries.member.1.MetricStat.Metric.MetricName": "TargetResponseTime",
                "MetricDataQueries.member.1.MetricStat.Metric.Dimensions.member.1.Name": "TargetGroup",
                "MetricDataQueries.member.1.MetricStat.Metric.Dimensions.member.1.Value": "targetgroup/web/1",
            }
            headers = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": MONITORING_AUTHORIZATION}
            status, _, body = raw("POST", "/", urlencode(form), headers)
            self.assertEqual(status, 200, body)
            return [float(v) for v in re.findall(rb"<Values>\s*<member>([^<]*)</member>", body)]

        # Nearest rank over 100 weighted samples of this dimension only.
        self.assertEqual(query("p99"), [0.2])
        self.assertEqual(query("p100"), [3.0])
        self.assertEqual(query("p50"), [0.1])

    def test_reset(self):
        client("ec2").create_vpc(CidrBlock="10.1.0.0/16")
        self.ebs.start_snapshot(VolumeSize=1)
        control("POST", "/_proxy/reset")
        stats = control("GET", "/_proxy/stats")
        self.assertEqual((stats["requests"], stats["snapshots"]), ({}, {}))
        self.assertEqual(control("GET", "/_proxy/requests"), [])
        vpcs = client("ec2").describe_vpcs()["Vpcs"]
        self.assertNotIn("10.1.0.0/16", [vpc["CidrBlock"] for vpc in vpcs])


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed")
    sys.exit(1 if failed else 0)
