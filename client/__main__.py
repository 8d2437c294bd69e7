import sys

from fedstream.client.main import main

sys.exit(main())
