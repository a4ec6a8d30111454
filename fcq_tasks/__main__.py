import sys

from fcq_tasks.cli import main

sys.exit(main())
