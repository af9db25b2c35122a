from sidecar.app.cli import main

raise SystemExit(main())
