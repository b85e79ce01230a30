"""The guest's built-in vsock services and user functions: shared/vsock/services.py, written
once for guest and host (this module keeps the guest's import path)."""
from shared.vsock.services import *  # noqa: F401,F403
from shared.vsock.services import (CHARGEN_CYCLE, DEFAULT_PORTS, HANDLERS, RECV_SIZE,  # noqa: F401
                                   Service, ServiceSpec, UserTask, chargen_line, chargen_pattern,
                                   check_function, parse_service, parse_source_request,
                                   resolve_function, run_user_function, source_pattern,
                                   start_service, start_services)
