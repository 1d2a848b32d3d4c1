from reflectevo.cli.main import main

raise SystemExit(main())
