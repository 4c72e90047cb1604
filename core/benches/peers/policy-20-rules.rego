# core/fixtures/policy-20-rules.yaml as Rego: the first matching rule's route, else the
# default. For the decide bench's side-by-side run with regorus.
package edgewise

import rego.v1

matched contains 0 if input.dataClass in {"private", "health", "financial"}

matched contains 1 if input.attributes.tenant in {"acme-bank", "stellar-health"}

matched contains 2 if input.network == "offline"

matched contains 3 if input.task == "autocomplete"

matched contains 4 if input.latencyBudgetMs < 150

matched contains 5 if input.inputTokens > 8000

matched contains 6 if input.task in {"reasoning", "planning", "code-review"}

matched contains 7 if input.complexity >= 0.8

matched contains 8 if {
	input.battery < 0.15
	input.network == "metered"
}

matched contains 9 if input.battery < 0.15

matched contains 10 if {
	input.modelVersion in {"1.0.0", "1.0.1", "1.1.0"}
	input.task in {"summarize", "translate"}
}

matched contains 11 if {
	input.task == "translate"
	input.inputTokens <= 512
}

matched contains 12 if input.task == "translate"

matched contains 13 if {
	input.task == "summarize"
	input.inputTokens > 2000
}

matched contains 14 if input.task in {"caption", "ocr"}

matched contains 15 if input.attributes.cohort == "beta"

matched contains 16 if input.network == "metered"

matched contains 17 if {
	input.task == "chat"
	input.complexity > 0.5
}

matched contains 18 if input.task == "chat"

matched contains 19 if not input.task

routes := [
	"on-device", "on-device", "on-device", "on-device", "on-device",
	"cloud-large", "cloud-large", "cloud-large", "on-device", "cloud-small",
	"cloud-small", "on-device", "cloud-small", "cloud-small", "on-device",
	"cloud-large", "on-device", "cloud-small", "on-device", "on-device",
]

default route := "on-device"

route := routes[min(matched)] if count(matched) > 0
