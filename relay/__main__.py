from relay.cli import main as cli

raise SystemExit(cli.main())
