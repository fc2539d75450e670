from cifarlab.course.cli import main

raise SystemExit(main())
