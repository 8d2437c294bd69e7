import sys

from fedstream.server.main import main

sys.exit(main())
