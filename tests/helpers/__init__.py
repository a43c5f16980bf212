"""What the tests share: the test app (its objects and routing code), settings and processes,
waiting on conditions, gateways, the wire view, the cluster and its faults. Test modules import
from here (and fixtures come from ``tests/conftest.py``); no test module imports another."""
