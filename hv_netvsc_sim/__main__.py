from hv_netvsc_sim.cli import main

raise SystemExit(main())
