from livesend.cli import main

raise SystemExit(main())
