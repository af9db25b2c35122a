"""A Salesforce token call: what counts as one (``call``, ``hosts``), its request and answer as plain
data (``messages``), the core that takes it from head to record (``core``), the sender that puts it on
the wire through a pair member (``sender``), the answers the sidecar gives in Salesforce's place
(``answers``) and the rotation shield (``shield``)."""
