from mixgf.cli import main

raise SystemExit(main())
