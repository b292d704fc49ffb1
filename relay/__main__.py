from relay import cli

raise SystemExit(cli.main())
