"""Shared pytest set-up: configure Jittor for this machine before any test imports it."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import runtime  # noqa: E402

jt = runtime.activate()
