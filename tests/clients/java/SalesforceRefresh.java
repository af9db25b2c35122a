// A Salesforce app's refresh and one REST call with java.net.http.HttpClient and no proxy or trust
// code: the default HttpClient uses the default ProxySelector (https.proxyHost/Port, http.nonProxyHosts)
// and the default SSLContext (javax.net.ssl.trustStore), both set through JAVA_TOOL_OPTIONS.
// Run with the JDK's single-file launcher: java SalesforceRefresh.java
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public class SalesforceRefresh {
    static String field(String json, String name) {
        Matcher m = Pattern.compile("\"" + name + "\"\\s*:\\s*\"([^\"]*)\"").matcher(json);
        return m.find() ? m.group(1) : null;
    }

    static String enc(String value) {
        return URLEncoder.encode(value, StandardCharsets.UTF_8);
    }

    static String quoted(String value) {
        return value == null ? "null" : "\"" + value + "\"";
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> env = System.getenv();
        HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        String form = "grant_type=refresh_token&refresh_token=" + enc(env.get("SF_REFRESH_TOKEN"))
                + "&client_id=" + enc(env.get("SF_CLIENT_ID")) + "&client_secret=" + enc(env.get("SF_CLIENT_SECRET"));
        HttpRequest refresh = HttpRequest.newBuilder(URI.create(env.get("SF_TOKEN_URL")))
                .timeout(Duration.ofSeconds(15))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .POST(HttpRequest.BodyPublishers.ofString(form))  // a String: sent with a Content-Length
                .build();
        HttpResponse<String> t = http.send(refresh, HttpResponse.BodyHandlers.ofString());
        String restStatus = "null";
        String versions = "null";
        if (t.statusCode() == 200) {
            HttpRequest api = HttpRequest.newBuilder(URI.create(field(t.body(), "instance_url") + "/services/data/"))
                    .timeout(Duration.ofSeconds(15))
                    .header("Authorization", "Bearer " + field(t.body(), "access_token"))
                    .build();
            HttpResponse<String> r = http.send(api, HttpResponse.BodyHandlers.ofString());
            restStatus = Integer.toString(r.statusCode());
            versions = Integer.toString(r.body().split("\"version\"", -1).length - 1);
        }
        String rotated = t.statusCode() == 200 ? field(t.body(), "refresh_token") : null;
        System.out.println("{\"token_status\":" + t.statusCode() + ",\"refresh_token\":" + quoted(rotated)
                + ",\"rest_status\":" + restStatus + ",\"api_versions\":" + versions + "}");
    }
}
