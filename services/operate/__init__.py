"""The operator's commands: ``durable objects ls``, ``state``, ``alarms ls``, ``call``, ``tail``
and ``doctor``. Reads come straight from Postgres (they work with no worker running); writes go
to the owning object as ordinary events (objects/admin.py), so gates and fencing hold."""
