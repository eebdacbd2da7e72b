"""The frozen executable's entry point: the same command line as pip's ``appliance``."""

from appliance.cli import main

raise SystemExit(main())
