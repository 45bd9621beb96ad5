"""``python -m seminar_tf``: the ``seminar-tf`` command (``seminar_tf.cli``)."""

import sys

from seminar_tf.cli import main

if __name__ == "__main__":
    sys.exit(main())
