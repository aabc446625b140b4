"""One module per ``cryo-forum`` command, each with ``add_args(parser)`` and ``main(args)``."""
